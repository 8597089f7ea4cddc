"""benchmarks/precision.py on a tiny project: scores and masks of another dtype/precision against the score files
the pipeline wrote."""

import json
import sys
from pathlib import Path

import pytest
import torch

from diet import api
from diet.config import ScoreConfig
from diet.io import write_jsonl
from diet.scorefile import model_fingerprint, write_scores
from tests.tiny import tiny_model, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TEXTS = {
    "arc_easy": ["the red fox jumps over the lazy dog", "which colour is the box? the box is green",
                 "a black jug and a white plant", "the brown dog is in the blue box"] * 2,
    "boolq": ["count 0 1 2 3 4 5 6 7 8 9", "five dozen liquor jugs, then 3 4 5",
              "question: which gas do plants take in? answer: carbon dioxide", "9 8 7 6 5 4 3 2 1 0"] * 2,
}


@pytest.fixture
def precision_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import precision

    yield precision
    sys.modules.pop("precision", None)


@pytest.fixture
def project(tmp_path):
    """models/base, data/tasks/<task>/calib.jsonl and scores/<task>.safetensors as the pipeline writes them
    (score.precision model, the default), and a params.yaml for sparsity 0.25 on mlp."""
    model_dir = tmp_path / "models" / "base"
    model = tiny_model("llama")
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cfg = ScoreConfig(groups=("mlp", "attention"), batch_size=4)
    for task, texts in TEXTS.items():
        write_jsonl(tmp_path / "data" / "tasks" / task / "calib.jsonl", [{"text": t} for t in texts])
        tensors, stats = api.score(model, tiny_tokenizer(), texts, cfg, max_length=64, progress=False)
        write_scores(tmp_path / "scores" / f"{task}.safetensors", tensors, {
            "model_fingerprint": model_fingerprint(model_dir), "task": task, "task_data_hash": "x",
            "n_samples": stats["n_samples"], "n_tokens": stats["n_tokens"], "statistic": cfg.statistic,
            "weight_norm": cfg.weight_norm})
    (tmp_path / "params.yaml").write_text(
        "tasks: [arc_easy, boolq]\ncalibration: {max_length: 64}\n"
        "score: {groups: [mlp, attention], batch_size: 4}\nprune: {sparsity: 0.25, groups: [mlp]}\n"
        "select: {multiple: 1}\n")
    return tmp_path


def _args(project, *extra):
    return ["--params", str(project / "params.yaml"), "--model", str(project / "models" / "base"),
            "--scores", str(project / "scores"), "--data", str(project / "data" / "tasks"), *extra]


def test_the_reference_settings_reproduce_the_score_files_exactly(precision_benchmark, project, tmp_path):
    out = tmp_path / "same.json"
    result = precision_benchmark.main(_args(project, "--device", "cpu", "--dtype", "float32",
                                            "--precision", "model", "--out", str(out)))
    assert result == 0
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["tasks"] == ["arc_easy", "boolq"]
    for groups in record["scores"].values():
        assert set(groups) == {"mlp", "attention"}
        for c in groups.values():
            assert c["rel_max"] == 0.0 and c["rank_shift_max"] == 0
    m = record["masks"]["mlp"]
    assert m["same_share"] == 1.0 and m["reference_only"] == m["here_only"] == 0
    assert m["kept_reference"] == sum(m["widths_reference"]) < 3 * 64                 # 3 layers of 64, some removed
    assert "| mlp | " in out.with_suffix(".md").read_text()


def test_bfloat16_is_measured_against_float32(precision_benchmark, project, tmp_path):
    out = tmp_path / "bf16.json"
    assert precision_benchmark.main(_args(project, "--device", "cpu", "--dtype", "bfloat16",
                                          "--precision", "model", "--out", str(out))) == 0
    record = json.loads(out.read_text())
    mlp = [record["scores"][t]["mlp"] for t in TEXTS]
    assert all(0 < c["rel_median"] <= c["rel_p99"] <= c["rel_max"] < 0.1 for c in mlp)   # bfloat16: a few %
    assert all(0 <= c["rank_shift_mean"] <= c["rank_shift_max"] < c["width"] == 64 for c in mlp)
    m = record["masks"]["mlp"]
    assert m["kept_both"] + m["reference_only"] == m["kept_reference"]
    assert m["kept_both"] + m["here_only"] == m["kept_here"]
    assert 0.9 <= m["same_share"] <= 1.0


def test_missing_score_files_are_a_clear_error(precision_benchmark, project, capsys):
    (project / "scores" / "boolq.safetensors").unlink()
    assert precision_benchmark.main(_args(project, "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "no score file for boolq" in err and "dvc repro" in err
