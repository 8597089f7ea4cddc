"""The field's baselines and bias recovery through the stage entry points (in process, on the tiny project),
and through ``diet.api.prune``."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from diet import api
from diet.config import MergeConfig, SelectConfig
from diet.checkpoint import load_model
from diet.scorefile import read_moments, read_scores, split_scores, write_scores
from diet.mask import Mask
from tests.repo_fixture import make_tiny_repo
from tests.test_pruning import held_at_means_logits, input_ids, logits
from tests.tiny import tiny_model, tiny_tokenizer

TASKS = ("t1", "t2")


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run(stage: str, *argv: str) -> int:
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    return module.run_stage(module.main, module.parser(), list(argv))


def write_params(repo: Path, name: str, **sections) -> str:
    values = yaml.safe_load((repo / "params.yaml").read_text())
    for section, value in sections.items():
        values[section] = {**values[section], **value}
    (repo / name).write_text(yaml.safe_dump(values, sort_keys=False))
    return name


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The tiny project with its base model, both tasks' score files and the generic score file."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("stages"), tasks=TASKS)
    with cwd(repo):
        assert run("model", "--out", "models/base") == 0
        for t in TASKS:
            assert run("prepare", "--task", t, "--out", f"data/tasks/{t}") == 0
            assert run("score", "--task", t, "--model", "models/base", "--calib", f"data/tasks/{t}/calib.jsonl",
                       "--out", f"scores/{t}.safetensors") == 0
        assert run("score_generic", "--model", "models/base", "--out", "baselines/generic.safetensors") == 0
    return repo


def merge_select_prune(repo: Path, params: str, tag: str) -> Path:
    with cwd(repo):
        assert run("merge", "--params", params, "--model", "models/base", "--scores", "scores",
                   "--generic", "baselines/generic.safetensors", "--out", f"merged-{tag}") == 0
        assert run("select", "--params", params, "--model", "models/base", "--merged", f"merged-{tag}",
                   "--out", f"masks-{tag}/mask.json") == 0
        assert run("prune", "--params", params, "--model", "models/base", "--mask", f"masks-{tag}/mask.json",
                   "--scores", "scores", "--generic", "baselines/generic.safetensors", "--out", f"pruned-{tag}") == 0
    return repo / f"pruned-{tag}"


def score_merge_select(repo: Path, params: str, tag: str) -> str:
    """Score every task, merge and select under ``params`` into folders named by ``tag``; the mask's path."""
    with cwd(repo):
        for t in TASKS:
            assert run("score", "--params", params, "--task", t, "--model", "models/base", "--calib",
                       f"data/tasks/{t}/calib.jsonl", "--out", f"scores-{tag}/{t}.safetensors") == 0
        assert run("merge", "--params", params, "--model", "models/base", "--scores", f"scores-{tag}",
                   "--out", f"merged-{tag}") == 0
        assert run("select", "--params", params, "--model", "models/base", "--merged", f"merged-{tag}",
                   "--out", f"masks-{tag}/mask.json") == 0
    return f"masks-{tag}/mask.json"


@pytest.mark.parametrize("method", ["flap", "wanda_sp", "vote"])
def test_stages_prune_with_bias_recovery_from_the_methods_data(scored, method):
    repo = scored
    params = write_params(repo, f"params-{method}.yaml", merge={"method": method}, prune={"recover": "bias"})
    out = merge_select_prune(repo, params, method)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recover"] == "bias"
    assert manifest["recover_means"] == ("tasks" if method == "vote" else "generic")
    assert json.loads((repo / f"merged-{method}" / "merge.json").read_text())["method"] == method
    if method == "vote":  # the plain average of the tasks' means
        means = sum(read_moments(repo / f"scores/{t}.safetensors")["mlp"]["mean"] for t in TASKS) / len(TASKS)
    else:
        means = read_moments(repo / "baselines/generic.safetensors")["mlp"]["mean"]
    mask = Mask.load(repo / f"masks-{method}/mask.json")
    dense = load_model(repo / "models/base")
    ids = input_ids(6)
    reference = held_at_means_logits(dense, mask.keep_tensors(), {"mlp": means}, ids)
    pruned = load_model(out)
    assert all(pruned.model.layers[i].mlp.down_proj.bias is not None for i in range(3))
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-5, rtol=1.3e-6)


def test_stages_prune_whole_kv_groups_with_per_group_constraints(scored):
    """prune.groups [mlp, attention] with multiple {mlp: 8, attention: 1} through merge, select and prune: KV
    groups go (the tiny llama has 2 per layer), MLP widths stay multiples of 8, and the checkpoint equals the
    dense model with the removed dimensions zeroed."""
    from diet.pruning import zero_mask

    repo = scored
    params = write_params(repo, "params-groups.yaml", prune={"groups": ["mlp", "attention"], "sparsity": 0.3},
                          select={"multiple": {"mlp": 8, "attention": 1}, "min_keep": {"mlp": 0.05, "attention": 0.5}})
    out = merge_select_prune(repo, params, "groups")

    mask = Mask.load(repo / "masks-groups/mask.json")
    assert mask.multiple == {"mlp": 8, "attention": 1} and mask.min_keep == {"mlp": 0.05, "attention": 0.5}
    assert 1 in mask.widths["attention"] and all(w in (1, 2) for w in mask.widths["attention"])
    assert all(w % 8 == 0 for w in mask.widths["mlp"]) and sum(mask.widths["mlp"]) < 3 * 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["widths"]["num_key_value_heads"] == mask.widths["attention"]
    assert manifest["checkpoint"]["widths"]["num_attention_heads"] == [2 * w for w in mask.widths["attention"]]
    ids = input_ids(7)
    reference = logits(zero_mask(load_model(repo / "models/base"), mask.keep_tensors()), ids)
    torch.testing.assert_close(logits(load_model(out), ids), reference, atol=1e-5, rtol=1.3e-6)


def test_baseline_orders_differ_from_the_task_aware_one(scored):
    repo = scored
    orders = {}
    for method in ("flap", "wanda_sp", "vote"):
        params = write_params(repo, f"params-order-{method}.yaml", merge={"method": method})
        with cwd(repo):
            assert run("merge", "--params", params, "--model", "models/base", "--scores", "scores",
                       "--generic", "baselines/generic.safetensors", "--out", f"order-{method}") == 0
        from safetensors.torch import load_file

        orders[method] = load_file(str(repo / f"order-{method}" / "votes.safetensors"))["mlp.priority"]
    assert not torch.equal(orders["flap"], orders["wanda_sp"])
    assert not torch.equal(orders["flap"], orders["vote"])


def test_score_files_without_moments_fail_at_merge_and_prune(scored, tmp_path, capsys):
    repo = scored
    old = tmp_path / "scores"
    old.mkdir()
    for t in TASKS:  # as written before score files carried moments
        scores, meta = read_scores(repo / f"scores/{t}.safetensors")
        write_scores(old / f"{t}.safetensors", scores, {k: v for k, v in meta.items() if k not in ("groups", "shapes")})
    params = write_params(repo, "params-old.yaml", prune={"recover": "bias"})
    with cwd(repo):
        assert run("merge", "--params", params, "--scores", str(old), "--out", "merged-old") == 2
        err = capsys.readouterr().err
        assert "carries no activation moments for mlp" in err and "dvc repro -f score@t1" in err
        assert not (repo / "merged-old").exists()
        merge_select_prune(repo, write_params(repo, "params-none.yaml"), "none")
        assert run("prune", "--params", params, "--mask", "masks-none/mask.json", "--scores", str(old),
                   "--out", "pruned-old") == 2
        assert "carries no activation moments" in capsys.readouterr().err
        assert not (repo / "pruned-old").exists()


def test_api_prune_with_baselines_and_recovery():
    tok = tiny_tokenizer()
    tasks = {"a": ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"],
             "b": ["question: which gas do plants take in? answer: carbon dioxide", "count 0 1 2 3 4 5"]}
    generic = ["a small model is pruned by removing whole dimensions", "the lazy dog sleeps in the sun"]
    ids = input_ids(7)
    for method in ("flap", "wanda_sp", "vote"):
        model = tiny_model("llama", seed=8)
        dense = tiny_model("llama", seed=8)
        pruned, mask = api.prune(model, tok, tasks, 0.2, merge_cfg=MergeConfig(method=method), groups=("mlp",),
                                 select_cfg=SelectConfig(multiple=1), generic_texts=generic, recover="bias",
                                 progress=False)
        texts = generic if method != "vote" else None
        if texts is not None:
            means = split_scores(api.score(dense, tok, texts, progress=False)[0])[1]["mlp"]["mean"]
        else:
            per_task = [split_scores(api.score(dense, tok, t, progress=False)[0])[1]["mlp"]["mean"]
                        for t in tasks.values()]
            means = sum(per_task) / len(per_task)
        reference = held_at_means_logits(dense, mask.keep_tensors(), {"mlp": means}, ids)
        torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-5, rtol=1.3e-6)
    with pytest.raises(Exception, match="generic_texts"):
        api.prune(tiny_model("llama"), tok, tasks, 0.2, merge_cfg=MergeConfig(method="random"), recover="bias",
                  progress=False)


@pytest.mark.parametrize("method", ["vote", "wanda_sp"])
def test_api_prune_with_the_refit_fits_on_the_methods_data(method):
    """api.prune(recover="refit") equals the mask's pruning followed by diet.refit on the method's texts (the
    tasks' for vote, the generic ones for wanda_sp), and moves the model off the plain pruning."""
    from diet.pruning import apply_mask
    from diet.refit import refit_on_texts

    tok = tiny_tokenizer()
    tasks = {"a": ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen jugs"] * 4,
             "b": ["question: which gas do plants take in? answer: carbon dioxide", "count 0 1 2 3 4 5"] * 4}
    generic = ["a small model is pruned by removing whole dimensions", "the lazy dog sleeps in the sun"] * 4
    ids = input_ids(7)
    pruned, mask = api.prune(tiny_model("llama", seed=8), tok, tasks, 0.2, merge_cfg=MergeConfig(method=method),
                             groups=("mlp",), select_cfg=SelectConfig(multiple=1), generic_texts=generic,
                             recover="refit", progress=False)
    sources = tasks if method == "vote" else {"generic": generic}
    reference = tiny_model("llama", seed=8)
    done, stats = refit_on_texts(reference, tok, sources, mask.keep_tensors(), progress=False)
    assert stats["n_samples"] == sum(len(t) for t in sources.values())
    apply_mask(reference, done.keep)
    plain = apply_mask(tiny_model("llama", seed=8), mask.keep_tensors())
    torch.testing.assert_close(logits(pruned, ids), logits(reference, ids))
    assert not torch.allclose(logits(pruned, ids), logits(plain, ids), atol=1e-4)


def test_stages_prune_residual_channels_with_the_mlp(scored):
    """score.groups with hidden, prune.groups [mlp, hidden], layout uniform, through score, merge, select and
    prune: one kept width for the residual stream, a stock checkpoint with a smaller hidden_size and embedding,
    the mask's decoder count equal to the checkpoint's, and logits equal to the dense model's with the removed
    residual channels and MLP channels zeroed."""
    from diet.pruning import zero_mask

    repo = scored
    params = write_params(repo, "params-hidden.yaml", score={"groups": ["mlp", "attention", "hidden"]},
                          prune={"groups": ["mlp", "hidden"], "sparsity": 0.3},
                          select={"multiple": {"mlp": 8, "hidden": 8}, "layout": "uniform"})
    mask_path = score_merge_select(repo, params, "hidden")
    with cwd(repo):
        assert run("prune", "--params", params, "--model", "models/base", "--mask", mask_path,
                   "--out", "pruned-hidden") == 0
    scores = json.loads((repo / f"scores-hidden/{TASKS[0]}.json").read_text())
    assert scores["shapes"]["hidden"] == [1, 32]
    mask = Mask.load(repo / "masks-hidden/mask.json")
    assert len(mask.widths["hidden"]) == 1 and mask.widths["hidden"][0] % 8 == 0 and mask.widths["hidden"][0] < 32
    assert len(set(mask.widths["mlp"])) == 1
    out = repo / "pruned-hidden"
    manifest = json.loads((out / "manifest.json").read_text())
    before, after = manifest["params_before"], manifest["params_after"]
    assert before["decoder"] - after["decoder"] == mask.removed
    assert after["embedding"] == before["embedding"] * mask.widths["hidden"][0] // 32
    assert manifest["checkpoint"]["stock_loadable"] is True
    assert json.loads((out / "config.json").read_text())["hidden_size"] == mask.widths["hidden"][0]
    ids = input_ids(8)
    reference = logits(zero_mask(load_model(repo / "models/base"), mask.keep_tensors()), ids)
    torch.testing.assert_close(logits(load_model(out), ids), reference, atol=1e-5, rtol=1.3e-6)


def test_stages_prune_refits_the_readers_of_a_pruned_residual_stream(scored):
    """prune.recover: refit with [mlp, hidden] through the stages: the manifest reports a row per projection the
    hidden refit solves for (q, k, v, o_proj, gate and up per layer; down_proj under mlp), no refit above keeping
    the dense columns, and the checkpoint stays stock and differs from the plain pruning's."""
    repo = scored
    common = dict(score={"groups": ["mlp", "attention", "hidden"]},
                  select={"multiple": {"mlp": 8, "hidden": 8}, "layout": "uniform"})
    plain = write_params(repo, "params-hidden-plain.yaml", prune={"groups": ["mlp", "hidden"], "sparsity": 0.3},
                         **common)
    refitted = write_params(repo, "params-hidden-refit.yaml", **common,
                            prune={"groups": ["mlp", "hidden"], "sparsity": 0.3, "recover": "refit",
                                   "refit_samples": 4})
    mask_path = score_merge_select(repo, plain, "hr")
    with cwd(repo):
        for name, params in (("plain", plain), ("refit", refitted)):
            assert run("prune", "--params", params, "--model", "models/base", "--mask", mask_path,
                       "--scores", "scores-hr", "--merged", "merged-hr", "--out", f"pruned-hr-{name}") == 0
    manifest = json.loads((repo / "pruned-hr-refit/manifest.json").read_text())
    groups = manifest["refit"]["groups"]
    rows = groups["hidden"]["layers"]
    layers = len(groups["mlp"]["layers"])
    assert [r["projection"].rsplit(".", 1)[-1] for r in rows[:6]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj"]
    base = load_model(repo / "models/base")
    untied_head = base.get_output_embeddings().weight is not base.get_input_embeddings().weight
    assert len(rows) == 6 * layers + untied_head
    assert groups["hidden"]["error_refit"] <= groups["hidden"]["error_none"]
    assert manifest["checkpoint"]["stock_loadable"] is True
    ids = input_ids(8)
    assert not torch.allclose(logits(load_model(repo / "pruned-hr-refit"), ids),
                              logits(load_model(repo / "pruned-hr-plain"), ids), atol=1e-4)


def test_the_refit_refuses_calibration_text_its_scores_were_not_computed_from(scored, tmp_path, capsys):
    """The prune stage depends on the score files alone (dvc.yaml): each task's calibration file must be the one
    its score file hashed, or the refit stops before loading a weight and writes nothing."""
    import shutil

    repo = scored
    merge_select_prune(repo, write_params(repo, "params-none.yaml"), "none")
    params = write_params(repo, "params-refit-check.yaml", prune={"recover": "refit", "refit_samples": 4})
    edited = tmp_path / "tasks"
    shutil.copytree(repo / "data/tasks", edited)
    calib = edited / "t2" / "calib.jsonl"
    calib.write_text(calib.read_text().replace('"text": "', '"text": "edited ', 1))
    with cwd(repo):
        assert run("prune", "--params", params, "--mask", "masks-none/mask.json", "--tasks-dir", str(edited),
                   "--out", "pruned-edited") == 2
        err = capsys.readouterr().err
        assert f"{calib} is not the calibration file that scores/t2.json was computed from" in err
        assert "dvc repro -f score@t2" in err or "score task 't2' again" in err
        assert not (repo / "pruned-edited").exists()
        # the files the scores were computed from pass the check
        assert run("prune", "--params", params, "--mask", "masks-none/mask.json", "--out", "pruned-checked") == 0
    manifest = json.loads((repo / "pruned-checked/manifest.json").read_text())
    assert manifest["recover"] == "refit" and manifest["refit"]["n_samples"] == 4 * len(TASKS)
