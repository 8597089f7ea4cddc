"""benchmarks/gpu.py on the CPU with its small shape: every measurement runs and the record holds together."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    yield gpu
    for name in ("gpu", "latency", "scoring"):  # benchmark modules, not the library's
        sys.modules.pop(name, None)


def test_small_run_writes_json_and_table(gpu_benchmark, tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu_benchmark.main(["--device", "cpu", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    s = result["settings"]
    assert s["shape"] == "small" and s["dtype"] == "bfloat16" and s["precision"] == "model"  # auto: the model dtype
    assert [r["batch_size"] for r in result["scoring"]] == [r["batch_size"] for r in result["evaluation"]] == [1, 4]
    for r in result["scoring"]:
        assert r["plain_tokens_per_s"] > 0 and r["score_tokens_per_s"] > 0 and r["score_over_plain"] > 0
        assert r["tokens"] == s["samples"] * s["tokens_per_sample"]
    assert all(r["tokens_per_s"] > 0 for r in result["evaluation"])
    names = [r["name"] for r in result["pruned"]]
    assert names == ["dense", "uniform 0.2", "global 0.2", "uniform 0.3", "global 0.3"]
    dense, *pruned = result["pruned"]
    assert dense["prefill_speedup"] == dense["decode_speedup"] == 1.0
    for r in pruned:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=0.05)
        assert r["params_decoder"] < dense["params_decoder"]
        assert r["mlp_width_max"] < dense["mlp_width_max"]
        assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0
        if r["layout"] == "uniform":
            assert r["mlp_width_min"] == r["mlp_width_max"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == 2 + 5 + 2  # two batch rows and five variants, under two header rows each
    assert "\n| global 0.3 | " in table and "\n| dense | 0.000 | " in table


def test_id_tokenizer_feeds_ids_through(gpu_benchmark):
    tok = gpu_benchmark.IdTokenizer()
    assert tok("17 4 250", add_special_tokens=False)["input_ids"] == [17, 4, 250]
    assert tok("17", add_special_tokens=True)["input_ids"] == [gpu_benchmark.BOS, 17]
    texts = gpu_benchmark.random_texts(3, 5, 100, seed=0)
    assert texts == gpu_benchmark.random_texts(3, 5, 100, seed=0) and len(texts[0].split()) == 5
    assert all(3 <= int(t) < 100 for text in texts for t in text.split())


def test_latency_table_names_each_variants_widths_per_group(gpu_benchmark):
    """benchmarks/latency.py's markdown: one row per variant, its kept widths per pruned group (min-max)."""
    import latency

    times = {f"{k}_{s}": v for k in latency.TIMES for s, v in (("ms", 10.0), ("ms_min", 9.0), ("ratio", 0.8))}
    row = {"achieved_sparsity": 0.2, "params_total": 105_000_000, "params_decoder": 80_000_000,
           "param_bytes": 420 * 2**20, "rss_peak_mb": 500.0, **times}
    table = latency.markdown({"variants": [
        {"name": "dense", "widths": {}, **row, "achieved_sparsity": 0.0},
        {"name": "vote [mlp+hidden]", "widths": {"mlp": (832, 1536), "hidden": (464, 464)}, **row}]})
    lines = table.splitlines()
    assert lines[0].startswith("| variant | achieved sparsity | widths min-max |")
    assert lines[2].startswith("| dense | 0.000 | - | 105.0 | 80.0 | 420 |")
    assert lines[3].startswith("| vote [mlp+hidden] | 0.200 | mlp 832-1536, hidden 464 | 105.0 |")
