"""benchmarks/refit.py on a one-layer random model of SmolLM2's shapes: the record holds together."""

import json
import sys

import pytest

from tests.test_benchmarks_gpu import BENCHMARKS


def test_refit_benchmark_records_cost_and_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from benchmarks import refit as bench

    out = tmp_path / "refit.json"
    bench.main(["--shapes", "smollm2-135m", "--layers", "1", "--samples", "12", "--length", "24", "--out", str(out)])
    record = next(iter(json.loads(out.read_text()).values()))
    assert record["layers"] == 1 and record["tokens"] == 12 * 24 and record["groups"] == ["mlp"]
    assert record["plain_s"] > 0 and record["refit_s"] > 0 and record["ratio"] > 0 and record["peak_mib"] >= 0
    assert record["gram_mib"] == pytest.approx(round(1229 ** 2 * 8 / 2 ** 20, 1))   # 80% of 1536 channels kept
    errors = record["errors"]["mlp"]
    assert 0 <= errors["refit"] <= errors["none"]
    assert "| random smollm2-135m shapes, 1 layers (mlp) |" in capsys.readouterr().out
    sys.modules.pop("benchmarks.refit", None)


def test_refit_benchmark_with_the_residual_stream(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent))
    from benchmarks import refit as bench

    out = tmp_path / "refit.json"
    bench.main(["--shapes", "smollm2-135m", "--layers", "1", "--samples", "6", "--length", "16", "--hidden",
                "--out", str(out)])
    record = next(iter(json.loads(out.read_text()).values()))
    assert record["groups"] == ["hidden", "mlp"]
    assert record["gram_mib"] == pytest.approx(round(1229 ** 2 * 8 / 2 ** 20, 1))   # the MLP's Gram is the larger
    for group in ("hidden", "mlp"):
        assert 0 <= record["errors"][group]["refit"] <= record["errors"][group]["none"]
    sys.modules.pop("benchmarks.refit", None)
