"""Bad input and foreign artifacts: every case fails with a clear error and changes nothing.

Each case feeds one wrong thing (a params value, a task file, a damaged or foreign artifact, a flow argument)
and asserts that the error names the problem and the fix (by meaningful substrings), that a stage entry
point prints ``error:`` / ``  fix:`` and no traceback, and that no file of the temporary project changed.
The artifacts are made once per module by the real stages on the tiny llama of ``tests/tiny.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from diet.config import Params
from diet.errors import ConfigError, DataError, DietError, ModelError
from stages._common import run_stage
from tests.test_tasks import needs_olmo
from tests.repo_fixture import MODEL_DIR, PROJECT, TINY_PARAMS, write_task, write_tiny_model

TASKS = ("t1", "t2")


# --- helpers ------------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def stage(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run ``stages/<name>.py`` in-process through ``run_stage``; (exit code, stderr)."""
    module = importlib.import_module(f"stages.{name}")
    capsys.readouterr()
    code = run_stage(module.main, module.parser(), [str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean(code: int, err: str, *needles: str) -> None:
    """Exit 2, ``error:`` and ``  fix:`` lines, no traceback, and every needle in the message."""
    assert code == 2, err
    assert "error: " in err and "\n  fix: " in err, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def fails_unchanged(repo: Path, name: str, argv: list[str], capsys, *needles: str) -> str:
    """The stage fails cleanly and leaves every file of ``repo`` as it was (nothing added, nothing changed)."""
    before = snapshot(repo)
    code, err = stage(name, argv, capsys)
    assert_clean(code, err, *needles)
    assert snapshot(repo) == before, "a failing stage changed or wrote files"
    return err


def write_params(repo: Path, **sections) -> Path:
    values = {"tasks": list(TASKS), **{k: dict(v) for k, v in TINY_PARAMS.items()}}
    for section, value in sections.items():
        values[section] = {**values[section], **value} if isinstance(value, dict) else value
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# --- one project with real artifacts, copied per test -------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def checkout_untouched():
    """Nothing is written into this checkout: the temporary projects hold every file a case writes."""
    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT, capture_output=True, text=True).stdout

    before = status()
    yield
    assert status() == before


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkout_untouched):
    """prepare, score, merge, select and prune run once (global layout), plus a uniform pruned checkpoint."""
    repo = tmp_path_factory.mktemp("bad-input") / "repo"
    for task in TASKS:
        write_task(repo, task)
    write_tiny_model(repo / MODEL_DIR)
    params = write_params(repo)
    model = repo / MODEL_DIR
    runs = [("prepare", ["--task", t, "--task-dir", repo / "data/tasks", "--out", repo / "data/tasks" / t])
            for t in TASKS]
    runs += [("score", ["--task", t, "--model", model, "--calib", repo / "data/tasks" / t / "calib.jsonl",
                        "--out", repo / "scores" / f"{t}.safetensors"]) for t in TASKS]
    runs += [("merge", ["--model", model, "--scores", repo / "scores", "--out", repo / "merged"]),
             ("select", ["--model", model, "--merged", repo / "merged", "--out", repo / "masks/mask.json"]),
             ("prune", ["--model", model, "--mask", repo / "masks/mask.json", "--out", repo / "models/pruned"])]
    for name, argv in runs:
        module = importlib.import_module(f"stages.{name}")
        assert run_stage(module.main, module.parser(), [*map(str, argv), "--params", str(params)]) == 0, name
    (repo.parent / "uniform").mkdir()
    uniform = write_params(repo.parent / "uniform", select={"layout": "uniform"})
    mask = repo.parent / "uniform/mask.json"
    for name, argv in [("select", ["--model", model, "--merged", repo / "merged", "--out", mask]),
                       ("prune", ["--model", model, "--mask", mask, "--out", repo.parent / "uniform/pruned"])]:
        module = importlib.import_module(f"stages.{name}")
        assert run_stage(module.main, module.parser(), [*map(str, argv), "--params", str(uniform)]) == 0, name
    return repo


@pytest.fixture
def repo(built, tmp_path):
    """A private copy of the built project."""
    dst = tmp_path / "repo"
    shutil.copytree(built, dst)
    return dst


def argv_of(repo: Path, name: str, task: str = "t1") -> list:
    model = repo / MODEL_DIR
    return {
        "prepare": ["--task", task, "--task-dir", repo / "data/tasks", "--out", repo / "data/tasks" / task],
        "score": ["--task", task, "--model", model, "--calib", repo / "data/tasks" / task / "calib.jsonl",
                  "--out", repo / "scores" / f"{task}.safetensors"],
        "merge": ["--model", model, "--scores", repo / "scores", "--out", repo / "merged"],
        "select": ["--model", model, "--merged", repo / "merged", "--out", repo / "masks/mask.json"],
        "prune": ["--model", model, "--mask", repo / "masks/mask.json", "--merged", repo / "merged",
                  "--scores", repo / "scores", "--tasks-dir", repo / "data/tasks",
                  "--out", repo / "models/pruned"],
    }[name] + ["--params", repo / "params.yaml"]


# --- params -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "", "-lead", "_lead", "has space", "t1.yaml", "ü", 7, None])
def test_task_names_follow_the_rule(name):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"tasks": [name]})
    assert "not a valid task name" in e.value.problem and "letters, digits" in e.value.problem
    assert "rename the task" in e.value.fix


def test_good_task_names_pass():
    assert Params.from_dict({"tasks": ["arc_easy", "my-task-2", "T3"]}).tasks == ("arc_easy", "my-task-2", "T3")


def test_path_like_task_fails_at_params_load_before_anything_is_written(repo, capsys):
    write_params(repo, tasks=["../x"])
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare"), capsys, "'../x' is not a valid task name",
                    "letters, digits, '_' and '-'")


def test_merge_weight_of_an_unlisted_task_fails_at_params_load():
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"tasks": ["t1"], "merge": {"weights": {"t1": 1.0, "boolq": 0.5}}})
    assert "merge.weights names 'boolq'" in e.value.problem and "not in 'tasks'" in e.value.problem
    assert "add the tasks to 'tasks'" in e.value.fix


def test_merge_weight_of_an_unlisted_task_fails_before_scores_are_read(repo, capsys):
    write_params(repo, merge={"weights": {"nope": 2.0}})
    shutil.rmtree(repo / "scores")  # the params check comes first: no score file is even looked for
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "merge.weights names 'nope'")


def test_stage_task_argument_follows_the_rule(repo, capsys):
    argv = argv_of(repo, "prepare")
    argv[1] = "../t1"
    fails_unchanged(repo, "prepare", argv, capsys, "'../t1' is not a valid task name")
    argv = argv_of(repo, "score")
    argv[1] = "../t1"
    fails_unchanged(repo, "score", argv, capsys, "--task '../t1' is not a valid task name")


def test_params_file_that_is_not_yaml(repo, capsys):
    (repo / "params.yaml").write_text("tasks: [t1\n")
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "not valid YAML", "fix the YAML syntax")


#: every number params.yaml holds, with a valid value: each must refuse a non-finite number, a string and a bool
NUMERIC_KEYS = {"calibration.n_samples": 4, "calibration.seed": 0, "calibration.max_length": 64,
                "score.batch_size": 2, "merge.seed": 0, "merge.weights.t1": 1.0, "prune.sparsity": 0.2,
                "select.min_keep": 0.05, "select.multiple": 8, "select.min_keep.mlp": 0.05,
                "select.multiple.mlp": 8, "evaluate.limit": 10, "evaluate.seed": 1234, "evaluate.batch_size": 2,
                "evaluate.perplexity_docs": 2, "evaluate.perplexity_max_length": 64, "prune.refit_damping": 0.01,
                "prune.refit_samples": 8, "export.perplexity_docs": 0}


def _with(key: str, value) -> dict:
    """Tiny params with ``key`` (dotted; a third part sets one entry of a mapping) set to ``value``."""
    data = {"tasks": list(TASKS), **{k: dict(v) for k, v in TINY_PARAMS.items()}}
    section, name, *entry = key.split(".")
    data.setdefault(section, {})
    data[section][name] = {entry[0]: value} if entry else value
    return data


@pytest.mark.parametrize("key", sorted(NUMERIC_KEYS))
def test_every_numeric_key_refuses_non_finite_strings_and_bools(key):
    Params.from_dict(_with(key, NUMERIC_KEYS[key]))                      # the valid value passes
    for bad in (float("inf"), float("-inf"), float("nan"), "8", True):
        with pytest.raises(ConfigError) as e:
            Params.from_dict(_with(key, bad))
        leaf = key.split(".")[-1]
        assert leaf in e.value.problem and repr(bad)[:3] in e.value.problem, (key, bad, e.value.problem)
        assert e.value.fix, (key, bad)


@pytest.mark.parametrize("weights", [{"t1": float("inf")}, {"t1": float("nan")}, {"t1": -1.0}])
def test_a_non_finite_merge_weight_fails_before_scores_are_read(repo, capsys, weights):
    write_params(repo, merge={"weights": weights})
    shutil.rmtree(repo / "scores")
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "merge.weights.t1", "finite non-negative number")


def test_weights_that_ignore_every_task_are_refused():
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"tasks": ["t1", "t2"], "merge": {"weights": {"t1": 0, "t2": 0.0}}})
    assert "every task" in e.value.problem and "weight above 0" in e.value.fix


@pytest.mark.parametrize("section, value, needles", [
    ("prune", "mlp", ("prune.groups = 'mlp' must be a list of names", "groups: [mlp]")),
    ("score", 5, ("score.groups = 5 must be a list of names", "groups: [mlp]")),
    ("score", "attention", ("score.groups = 'attention' must be a list", "groups: [attention]")),
], ids=["prune-string", "score-int", "score-string"])
def test_a_group_list_given_as_one_value_is_refused_whole(repo, capsys, section, value, needles):
    write_params(repo, **{section: {"groups": value}})
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, *needles)


# --- dimension groups and their selection constraints (select.min_keep, select.multiple) -----------------------

@pytest.mark.parametrize("select, needles", [
    ({"multiple": {"mlp": 8, "heads": 1}}, ("select.multiple names an unknown group 'heads'", "mlp, attention")),
    ({"min_keep": {"mlp": 1.5}}, ("select.min_keep.mlp = 1.5 must be in [0, 1)", "e.g. 0.05")),
    ({"multiple": {"mlp": 0}}, ("select.multiple.mlp = 0 must be a positive integer", "e.g. 8")),
    ({"multiple": {}}, ("select.multiple is an empty mapping", "one per pruned group")),
    ({"multiple": {"attention": 1}}, ("none for mlp, which prune.groups prunes", "add mlp: <value>")),
], ids=["unknown-group", "min-keep-range", "multiple-zero", "empty-mapping", "mapping-misses-a-pruned-group"])
def test_per_group_constraints_fail_at_params_load(repo, capsys, select, needles):
    write_params(repo, select=select)
    shutil.rmtree(repo / "merged")  # the params check comes first: no priority file is even looked for
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys, *needles)


def test_a_multiple_wider_than_the_group_fails_before_the_priorities_are_read(repo, capsys):
    """The tiny llama has 2 KV groups per layer: the default multiple 8 could never remove one."""
    write_params(repo, prune={"groups": ["mlp", "attention"]})
    shutil.rmtree(repo / "merged")  # checked against the model's widths first: no priority file is looked for
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys,
                    "select.multiple = 8 is not smaller than the attention group's width (at most 2 per layer)",
                    "select.multiple: {mlp: 8, attention: 1}")


def test_a_min_keep_that_keeps_every_dimension_fails_before_the_priorities_are_read(repo, capsys):
    write_params(repo, prune={"groups": ["mlp", "attention"]},
                 select={"multiple": {"mlp": 8, "attention": 1}, "min_keep": {"mlp": 0.05, "attention": 0.6}})
    shutil.rmtree(repo / "merged")
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys,
                    "select.min_keep.attention = 0.6 keeps every attention dimension", "nothing is left to prune",
                    "set select.min_keep.attention to at most 0.5 (keeping 1 of 2)", "attention: 0.5}")


def test_attention_on_a_model_with_one_kv_head_per_layer_fails_before_any_weight_is_read(repo, capsys):
    """Multi-query attention (Gemma-3-270M has one KV head per layer): no KV group can go."""
    from tests.tiny import tiny_model

    mqa = repo / "data/mqa_model"
    tiny_model("gemma3_text", num_key_value_heads=1).save_pretrained(mqa)
    for weights in mqa.glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # geometry comes from config.json alone
    write_params(repo, prune={"groups": ["mlp", "attention"]}, select={"multiple": {"mlp": 8, "attention": 1}})
    argv = argv_of(repo, "select")
    argv[1] = mqa
    err = fails_unchanged(repo, "select", argv, capsys, "prune.groups includes 'attention'",
                          "single KV head (multi-query attention)", "set prune.groups to ['mlp']")
    assert "not weights" not in err


def test_a_budget_above_what_the_group_holds_fails_at_merge(repo, capsys):
    """Attention holds about a third of the tiny llama's decoder parameters: half of them cannot be removed."""
    write_params(repo, prune={"groups": ["attention"], "sparsity": 0.5}, select={"multiple": 1})
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "sparsity 0.5 asks to remove",
                    "the groups ['attention'] hold only", "lower prune.sparsity below 0.33")


def test_a_budget_that_would_empty_a_layers_heads_fails_at_select(repo, capsys):
    """Every layer keeps at least one KV group (of 2): at most half the attention parameters can go."""
    write_params(repo, prune={"groups": ["attention"], "sparsity": 0.2},
                 select={"multiple": {"attention": 1}, "min_keep": {"attention": 0.0}})
    assert stage("merge", argv_of(repo, "merge"), capsys)[0] == 0  # the budget fits what attention holds
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys, "prune.sparsity 0.2 cannot be reached",
                    "at most 0.16", "set prune.sparsity <= 0.16")


HIDDEN_SCORED = {"groups": ["mlp", "attention", "hidden"]}


def test_a_hidden_multiple_wider_than_the_residual_fails_before_the_priorities_are_read(repo, capsys):
    """The tiny llama's residual stream has 32 channels, one mask for every layer."""
    write_params(repo, score=HIDDEN_SCORED, prune={"groups": ["mlp", "hidden"]},
                 select={"multiple": {"mlp": 8, "hidden": 64}})
    shutil.rmtree(repo / "merged")
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys,
                    "select.multiple.hidden = 64 is not smaller than the hidden group's width (32, one mask for "
                    "every layer)", "select.multiple: {mlp: 8, hidden: 1}")


def test_a_hidden_budget_beyond_its_floor_fails_at_select(repo, capsys):
    """hidden holds every decoder parameter, but min_keep 0.5 keeps half the residual channels."""
    write_params(repo, score=HIDDEN_SCORED, prune={"groups": ["hidden"], "sparsity": 0.6},
                 select={"multiple": {"hidden": 8}, "min_keep": {"hidden": 0.5}})
    votes = repo / "merged/votes.safetensors"
    save_file({**load_file(str(votes)), "hidden.priority": torch.arange(32.0)[None]}, str(votes))  # (1, H)
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys, "prune.sparsity 0.6 cannot be reached",
                    "at most 0.5", "set prune.sparsity <= 0.5")


@pytest.mark.parametrize("sections, needles", [
    ({"prune": {"groups": ["mlp", "hidden"]}}, ("which score.groups does not score", "add hidden to score.groups")),
    ({"score": HIDDEN_SCORED, "prune": {"groups": ["hidden"], "recover": "bias"}},
     ("prune.recover: bias cannot hold the removed hidden dimensions", "set prune.recover: none")),
    ({"score": HIDDEN_SCORED, "prune": {"groups": ["hidden"], "refit_choose": "obs", "recover": "refit"}},
     ("prune.refit_choose: obs chooses MLP channels", "prune.refit_choose: mask")),
], ids=["unscored", "recovery", "obs-without-mlp"])
def test_hidden_group_misuse_fails_at_params_load(repo, capsys, sections, needles):
    write_params(repo, **sections)
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, *needles)


def test_hidden_scores_missing_from_the_score_files_fail_at_merge(repo, capsys):
    """score.groups gained hidden but the score files predate it: merge names the stage to rerun."""
    write_params(repo, score=HIDDEN_SCORED, prune={"groups": ["hidden"]})
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "prune.groups ['hidden'] were not measured",
                    "the scores hold attention, mlp", "dvc repro")


# --- task files ---------------------------------------------------------------------------------------------

def edit_task(repo: Path, task: str = "t1", **fields) -> None:
    path = repo / "data/tasks" / f"{task}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_a_literal_list_of_one_choice_fails_at_load(repo, capsys):
    edit_task(repo, "t2", choices=["yes"])
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare", "t2"), capsys,
                    "t2.yaml", "'choices' lists 1 choice(s)", "at least 2")


@pytest.mark.parametrize("template, needle", [
    ("{question.__class__}", "{question.__class__} is not a plain field name"),
    ("{question[0]}", "{question[0]} is not a plain field name"),
    ("{0}", "{0} is not a plain field name"),
    ("{}", "empty field {} is not a plain field name"),
    ("{question!r}", "conversion or format spec"),
    ("{question:>{width}}", "conversion or format spec"),
    ("Question: {question", "not a valid format string"),
])
def test_prompt_templates_are_plain_field_names(repo, capsys, template, needle):
    edit_task(repo, "t1", prompt=template)
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare"), capsys, "t1.yaml", needle, "use plain row fields only")


def test_choice_templates_are_plain_field_names(repo, capsys):
    edit_task(repo, "t2", choices=["{passage.upper}", "yes"])
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare", "t2"), capsys,
                    "'choices' template '{passage.upper}'", "not a plain field name")


def rewrite_rows(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(change(i, r)) + "\n" for i, r in enumerate(rows)))


@pytest.mark.parametrize("value, shown", [(["red"], "['red']"), ("red", "'red'"), ([], "[]")])
def test_a_choices_field_with_fewer_than_two_choices_fails_naming_the_row(repo, capsys, value, shown):
    rewrite_rows(repo / "data/tiny/t1/train.jsonl", lambda i, r: {**r, "choices": value} if i >= 3 else r)
    err = fails_unchanged(repo, "prepare", argv_of(repo, "prepare"), capsys,
                          "t1.yaml", f"choices field 'choices' holds {shown}", "at least 2 choices")
    row = int(err.split("row train-")[1].split(":")[0])  # the first sampled row among the damaged ones
    assert row >= 3


def test_an_empty_local_data_file(repo, capsys):
    (repo / "data/tiny/t1/train.jsonl").write_text("")
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare"), capsys,
                    "train.jsonl (split 'train') is empty", "dvc repro prepare@t1")


def test_a_local_data_file_that_is_not_json(repo, capsys):
    (repo / "data/tiny/t1/train.jsonl").write_text('{"question": "a", "choices": ["x", "y"], "answer": 0}\n{oops\n')
    fails_unchanged(repo, "prepare", argv_of(repo, "prepare"), capsys,
                    "cannot read split 'train'", "train.jsonl", "dvc repro prepare@t1")


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_text(p.read_text()[:-40]), "line 8: not valid JSON"),               # truncated
    (lambda p: rewrite_rows(p, lambda i, r: {k: v for k, v in r.items() if k != "text"}), "row lacks text"),
    (lambda p: rewrite_rows(p, lambda i, r: {**r, "text": 5}), "'text' is int, not a string"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8"),
])
def test_damaged_calibration_data(repo, capsys, damage, needle):
    damage(repo / "data/tasks/t1/calib.jsonl")
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "calib.jsonl", needle, "dvc repro prepare@t1")


def test_damaged_evaluation_data_and_meta(repo):
    from diet.tasks import read_prepared

    folder = repo / "data/tasks/t1"
    rewrite_rows(folder / "eval.jsonl", lambda i, r: {k: v for k, v in r.items() if k != "label"})
    with pytest.raises(DataError) as e:
        read_prepared(folder)
    assert "eval.jsonl, line 1: row lacks label" in e.value.problem and "prepare the task data for t1" in e.value.fix
    assert e.value.artifact == "prepared_task:t1"
    (folder / "meta.json").write_text('{"task": "t1", ')
    with pytest.raises(DataError) as e:
        read_prepared(folder, "calib")
    assert "meta.json is not valid JSON" in e.value.problem and "prepare the task data for t1" in e.value.fix
    assert e.value.artifact == "prepared_task:t1"


# --- score files --------------------------------------------------------------------------------------------

def rewrite_scores(path: Path, tensors=None, header=None) -> None:
    """Rewrite a score file with changed tensors and/or header (None: keep)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors if tensors is not None else load_file(str(path)), str(path),
              metadata=meta if header is None else header)


def scores_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["diet"])


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-100])


def _foreign(p):
    p.write_text("mlp,layer,score\n0,0,1.0\n")


def _no_meta(p):
    save_file(load_file(str(p)), str(p))
    p.with_suffix(".json").unlink()


def _meta_lacks_shapes(p):
    meta = scores_meta(p)
    del meta["shapes"]
    rewrite_scores(p, header={"diet": json.dumps(meta)})


def _one_d(p):
    rewrite_scores(p, tensors={k: v.flatten() for k, v in load_file(str(p)).items()})


def _ints(p):
    rewrite_scores(p, tensors={k: v.to(torch.int32) for k, v in load_file(str(p)).items()})


def _extra_group(p):
    rewrite_scores(p, tensors={**load_file(str(p)), "hidden": torch.zeros(3, 32)})


def _wrong_shape(p):
    rewrite_scores(p, tensors={k: v[:, :-1].contiguous() if k == "mlp" else v for k, v in load_file(str(p)).items()})


def _nan(p):
    t = load_file(str(p))
    t["mlp"][0, 0] = float("nan")
    rewrite_scores(p, tensors=t)


@pytest.mark.parametrize("damage, needle", [
    (_truncate, "not a readable safetensors score file"),
    (_foreign, "not a readable safetensors score file"),
    (_no_meta, "carries no score metadata"),
    (_meta_lacks_shapes, "score metadata lacks shapes"),
    (_one_d, "1-D torch.float32 tensor, not 2-D float"),
    (_ints, "2-D torch.int32 tensor, not 2-D float"),
    (_extra_group, "holds groups ['attention', 'hidden', 'mlp'] but its metadata lists ['attention', 'mlp']"),
    (_wrong_shape, "have shape [3, 63], the metadata says [3, 64]"),
    (_nan, "contain NaN or infinite values"),
], ids=["truncated", "foreign", "no-metadata", "metadata-lacks-shapes", "1-D", "int", "extra-group", "shape", "nan"])
def test_damaged_score_files(repo, capsys, damage, needle):
    damage(repo / "scores/t1.safetensors")
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "t1.safetensors", needle, "dvc repro -f score@t1")


def test_score_file_of_another_model(repo, capsys):
    path = repo / "scores/t2.safetensors"
    rewrite_scores(path, header={"diet": json.dumps({**scores_meta(path), "model_fingerprint": "f" * 64})})
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "scored on model ffff", "dvc repro -f score@t2")


def test_score_file_of_another_task(repo, capsys):
    """t2's score file copied over t1's: its metadata names t2, and merge refuses it for t1."""
    shutil.copy(repo / "scores/t2.safetensors", repo / "scores/t1.safetensors")
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "t1.safetensors holds the scores of task 't2', "
                    "not of task 't1'", "dvc.lock entry", "dvc repro -f score@t1")


def _swap_rows(p):
    """Two layers' rows of the MLP scores swapped, the header (and its checksum) kept: same size, other data."""
    t = load_file(str(p))
    t["mlp"] = t["mlp"][[1, 0, *range(2, t["mlp"].shape[0])]].contiguous()
    rewrite_scores(p, tensors=t)


def test_score_payload_changed_after_writing(repo, capsys):
    size = (repo / "scores/t1.safetensors").stat().st_size
    _swap_rows(repo / "scores/t1.safetensors")
    assert (repo / "scores/t1.safetensors").stat().st_size == size
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "t1.safetensors: its scores are not the ones "
                    "written", "DVC cache object", "dvc repro -f score@t1", "dvc status -c")


def test_score_file_without_a_payload_checksum(repo, capsys):
    path = repo / "scores/t1.safetensors"
    meta = {k: v for k, v in scores_meta(path).items() if k != "payload_sha256"}
    rewrite_scores(path, header={"diet": json.dumps({**meta, "score_version": 1})})
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "records no checksum of its scores",
                    "score_version 1", "dvc repro -f score@t1")


def test_moments_of_another_task_are_refused_for_the_bias_recovery(repo, capsys):
    write_params(repo, prune={"recover": "bias"})
    shutil.copy(repo / "scores/t1.safetensors", repo / "scores/t2.safetensors")
    fails_unchanged(repo, "merge", argv_of(repo, "merge"), capsys, "holds the scores of task 't1', not of task 't2'")


@pytest.mark.parametrize("recover, choose", [("refit", "mask"), ("refit_bias", "mask"), ("refit", "obs")])
def test_prune_refits_the_kept_weights_and_reports_the_calibration_error(repo, capsys, recover, choose):
    from diet.io import read_json

    write_params(repo, prune={"recover": recover, "refit_samples": 6, "refit_choose": choose})
    out = repo / "refit"
    code, err = stage("prune", [*argv_of(repo, "prune")[:-4], "--out", out, "--params", repo / "params.yaml"],
                      capsys)
    assert code == 0, err
    manifest = read_json(out / "manifest.json")
    assert manifest["recover"] == recover
    mlp = manifest["refit"]["groups"]["mlp"]
    assert manifest["refit"]["sources"] == list(TASKS) and manifest["refit"]["n_samples"] == 12
    assert len(mlp["layers"]) == 3 and mlp["error_refit"] < mlp["error_none"], mlp
    none = load_file(str(repo / "models/pruned/model.safetensors"))
    refitted = load_file(str(out / "model.safetensors"))
    assert set(none) <= set(refitted)
    down = [k for k in none if "down_proj.weight" in k]
    assert down and any(not torch.equal(none[k], refitted[k]) for k in down)
    assert manifest["params_after"] == read_json(repo / "models/pruned/manifest.json")["params_after"] or \
        recover == "refit_bias"                                       # the same size; refit_bias adds biases
    if choose == "mask":
        assert all(torch.equal(none[k], refitted[k]) for k in none if "down_proj" not in k)
    else:
        assert manifest["refit"]["choose"] == "obs" and {r["kept"] for r in mlp["layers"]} <= {"obs", "refit", "dense"}
        chose = [r for r in mlp["layers"] if r["kept"] == "obs"]
        assert chose and all(r["channels_changed"] > 0 for r in chose), mlp["layers"]


@needs_olmo
def test_refit_for_a_method_that_ranks_without_the_tasks_fits_on_as_many_generic_texts(repo, capsys):
    from diet.io import read_json

    write_params(repo, prune={"recover": "refit", "refit_samples": 3}, merge={"method": "wanda_sp"})
    out = repo / "refit-generic"
    code, err = stage("prune", [*argv_of(repo, "prune")[:-4], "--out", out, "--params", repo / "params.yaml"],
                      capsys)
    assert code == 0, err
    refit = read_json(out / "manifest.json")["refit"]
    assert refit["sources"] == ["generic"] and refit["n_samples"] == 3 * len(TASKS)


def test_refit_without_the_calibration_samples_fails_before_the_model_is_read(repo, capsys, monkeypatch):
    import diet.checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the calibration samples were checked")

    monkeypatch.setattr(diet.checkpoint, "load_model_and_tokenizer", no_load)
    write_params(repo, prune={"recover": "refit"})
    (repo / "data/tasks/t2/calib.jsonl").unlink()
    fails_unchanged(repo, "prune", argv_of(repo, "prune"), capsys, "prepared calibration data missing",
                    "t2/calib.jsonl", "dvc repro prepare@t2")


def test_damaged_generic_scores_name_their_own_stage(repo, capsys):
    shutil.copy(repo / "scores/t1.safetensors", repo / "generic.safetensors")
    _truncate(repo / "generic.safetensors")
    write_params(repo, merge={"method": "task_agnostic"})
    fails_unchanged(repo, "merge", [*argv_of(repo, "merge"), "--generic", repo / "generic.safetensors"], capsys,
                    "generic.safetensors", "not a readable safetensors", "dvc repro -f score_generic")


# --- merged priorities --------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, needle", [
    (_truncate, "not a readable safetensors file"),
    (lambda p: save_file({"attention.priority": torch.zeros(3, 2)}, str(p)), "holds no priority for group 'mlp'"),
    (lambda p: save_file({"mlp.priority": torch.zeros(3, 60)}, str(p)), "the model needs a float (3, 64) one"),
], ids=["truncated", "missing-group", "shape"])
def test_damaged_merged_priorities(repo, capsys, damage, needle):
    damage(repo / "merged/votes.safetensors")
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys, "votes.safetensors", needle, "dvc repro merge")


# --- masks --------------------------------------------------------------------------------------------------

def edit_json(path: Path, change) -> None:
    """Apply ``change`` to the JSON object in ``path`` and write it back."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_mask(repo: Path, change) -> None:
    edit_json(repo / "masks/mask.json", change)


def _set_layer(i, value):
    def change(d):
        d["keep"]["mlp"][i] = value(d["keep"]["mlp"][i])
    return change


@pytest.mark.parametrize("damage, needle", [
    (lambda d: None, "not valid JSON"),  # replaced by a truncation below
    (lambda d: d.pop("keep"), "lacks keep"),
    (lambda d: d.pop("params_after"), "lacks params_after"),
    (_set_layer(0, lambda k: k[:-1] + [64]), "group 'mlp' layer 0 has indices outside [0, 64)"),
    (_set_layer(1, lambda k: [-1] + k[1:]), "group 'mlp' layer 1 has indices outside [0, 64)"),
    (_set_layer(2, lambda k: k[:1] + k[:-1]), "group 'mlp' layer 2 lists an index twice"),
    (_set_layer(0, lambda k: []), "group 'mlp' layer 0 keeps nothing (an empty layer)"),
    (_set_layer(0, lambda k: k[::-1]), "layer 0: kept indices are not sorted"),
    (_set_layer(0, lambda k: k[:-8]), "the summary's widths"),
    (lambda d: d["keep"]["mlp"].pop(), "keeps 2 layers, its base_widths list 3"),
    (lambda d: d["keep"].update(heads=d["keep"]["mlp"]), "unknown group 'heads'"),
    (lambda d: d["keep"].update(hidden=d["keep"]["mlp"]), "group 'hidden' has no list of positive base widths"),
    (lambda d: d.update(params_after=d["params_before"] + 1), "0 < params_after <= params_before"),
    (lambda d: d.update(layout="diagonal"), "layout 'diagonal'"),
], ids=["truncated", "no-keep", "no-params-after", "index-too-large", "negative-index", "duplicate", "empty-layer",
        "unsorted", "widths-vs-keep", "layer-count", "unknown-group", "hidden-without-widths", "params", "layout"])
def test_damaged_masks(repo, capsys, damage, needle):
    if needle == "not valid JSON":
        path = repo / "masks/mask.json"
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    else:
        edit_mask(repo, damage)
    fails_unchanged(repo, "prune", argv_of(repo, "prune"), capsys, "mask.json", needle, "dvc repro select")


def test_mask_of_a_model_with_other_widths(repo, capsys):
    edit_mask(repo, lambda d: d["base_widths"].update(mlp=[96, 96, 96]))
    fails_unchanged(repo, "prune", argv_of(repo, "prune"), capsys,
                    "was selected for mlp widths [96, 96, 96]", "has [64, 64, 64]", "dvc repro select")


def test_missing_mask(repo, capsys):
    (repo / "masks/mask.json").unlink()
    fails_unchanged(repo, "prune", argv_of(repo, "prune"), capsys, "mask file not found", "dvc repro select")


# --- model folders and checkpoints --------------------------------------------------------------------------

def test_missing_base_model_folder_is_not_a_hub_error(repo, capsys):
    shutil.rmtree(repo / MODEL_DIR)
    err = fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "tiny_model does not exist",
                          "dvc repro model")
    assert "repo id" not in err.lower() and "huggingface" not in err.lower()
    fails_unchanged(repo, "select", argv_of(repo, "select"), capsys, "tiny_model does not exist")  # geometry too


def test_model_source_folder_that_does_not_exist_is_not_a_hub_error(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)  # model.source is relative to the project root, like in params.yaml
    write_params(repo, model={"source": "data/tiny_modle"})
    err = fails_unchanged(repo, "model", ["--out", repo / "models/base", "--params", repo / "params.yaml"], capsys,
                          "model.source 'data/tiny_modle' does not exist", "an existing folder")
    assert "hub" not in err.split("fix:")[0]


def test_model_source_folder_of_an_unknown_model_type(repo, capsys):
    edit_config(repo / MODEL_DIR, lambda c: c.update(model_type="llamaXL"))
    write_params(repo, model={"source": str(repo / MODEL_DIR)})
    fails_unchanged(repo, "model", ["--out", repo / "models/base", "--params", repo / "params.yaml"], capsys,
                    "model.source: ", "model_type 'llamaXL' is unknown to transformers", "point model.source")


def edit_config(folder: Path, change) -> None:
    edit_json(folder / "config.json", change)


def test_model_type_transformers_does_not_know(repo, capsys):
    edit_config(repo / MODEL_DIR, lambda c: c.update(model_type="llamaXL"))
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys,
                    "model_type 'llamaXL' is unknown to transformers", "use a checkpoint of a supported family")


def test_config_that_is_not_json(repo, capsys):
    (repo / MODEL_DIR / "config.json").write_text('{"model_type": "llama",')
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "config.json is not valid JSON", "dvc repro model")


def test_missing_tokenizer(repo, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (repo / MODEL_DIR / name).unlink(missing_ok=True)
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "cannot load the tokenizer", "dvc repro model")


def test_truncated_weights(repo, capsys):
    weights = repo / MODEL_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "cannot load the weights of", "dvc repro model")


def load_error(folder: Path) -> ModelError:
    from diet.checkpoint import load_model

    with pytest.raises(ModelError) as e:
        load_model(folder)
    return e.value


def test_pruned_config_with_a_per_layer_list_of_the_wrong_length(repo):
    pruned = repo / "models/pruned"
    edit_config(pruned, lambda c: (c.pop("per_layer_config"), c.update(intermediate_sizes=[8, 8])))  # older form
    e = load_error(pruned)
    assert "intermediate_sizes lists 2 widths for num_hidden_layers = 3" in e.problem
    assert "rewrite the pruned checkpoint" in e.fix and e.artifact == "pruned_model"


def test_pruned_config_with_a_layer_beyond_the_last(repo):
    pruned = repo / "models/pruned"
    edit_config(pruned, lambda c: c["per_layer_config"].update({"3": {"intermediate_size": 8}}))
    e = load_error(pruned)
    assert "per_layer_config key '3' is not a layer index below num_hidden_layers = 3" in e.problem
    assert "rewrite the pruned checkpoint" in e.fix and e.artifact == "pruned_model"


def test_unknown_per_layer_model_type(repo):
    edit_config(repo / "models/pruned", lambda c: c.update(model_type="diet_falcon"))
    e = load_error(repo / "models/pruned")
    assert "'diet_falcon', which this version of diet does not define" in e.problem
    assert "rewrite the pruned checkpoint with this one" in e.fix and e.artifact == "pruned_model"


def test_missing_registration_names_the_import(repo, monkeypatch):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    extra = {k: v for k, v in CONFIG_MAPPING._extra_content.items() if k != "diet_llama"}
    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", extra)
    e = load_error(repo / "models/pruned")
    assert "diet classes are not registered" in e.problem
    assert "import diet.modeling before AutoModelForCausalLM.from_pretrained" in e.fix and "load_model" in e.fix


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p / "manifest.json").unlink(), "has no manifest.json"),
    (lambda p: (p / "manifest.json").write_text('{"checkpoint": {'), "manifest.json is not valid JSON"),
    (lambda p: edit_manifest(p, lambda m: m.pop("checkpoint")), "lacks its 'checkpoint' entry"),
    (lambda p: edit_manifest(p, lambda m: m["checkpoint"].update(model_type="diet_qwen2")),
     "describes a 'diet_qwen2' checkpoint"),
    (lambda p: edit_manifest(p, lambda m: m["checkpoint"]["widths"]["intermediate_size"].reverse()),
     "gives intermediate_size per layer"),
    (lambda p: edit_manifest(p, lambda m: m["checkpoint"]["parameters"].update(total=7)),
     "counts 7 parameters, the loaded weights"),
], ids=["missing", "truncated", "no-checkpoint", "model-type", "widths", "parameters"])
def test_damaged_pruned_manifest(repo, damage, needle):
    pruned = repo / "models/pruned"
    if needle == "gives intermediate_size per layer":
        layers = json.loads((pruned / "config.json").read_text())["per_layer_config"].values()
        assert len({layer["intermediate_size"] for layer in layers}) > 1
    damage(pruned)
    e = load_error(pruned)
    assert needle in e.problem and "rewrite the pruned checkpoint" in e.fix and e.artifact == "pruned_model"


def test_model_cards_say_how_to_load(built):
    from diet.checkpoint import load_model

    card = (built / "models/pruned/README.md").read_text()
    assert "diet_llama" in card and "import diet.modeling" in card and "diet.modeling.load_model(" in card
    meta = yaml.safe_load(card.split("---\n")[1])  # the Hub's front matter
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "diet" in meta["tags"] and meta["diet"]["layout"] == "global" and meta["diet"]["tasks"]
    assert "dvc repro export" in card and "llama-cli -m models/gguf/" in card
    uniform = built.parent / "uniform/pruned"
    card = (uniform / "README.md").read_text()
    assert "plain transformers loads it" in card and "import diet" not in card
    assert json.loads((uniform / "config.json").read_text())["model_type"] == "llama"
    assert load_model(uniform).config.model_type == "llama"  # its manifest checks out too


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: about 5 s
def test_a_global_checkpoint_without_the_import_is_what_the_card_warns_of(built):
    """Plain transformers, without ``import diet.modeling``, does not know the per-layer model type."""
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print('refused', 'diet_llama' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code, str(built / "models/pruned")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "refused True", out.stderr[-2000:]


# --- stage entry points -------------------------------------------------------------------------------------

def _boom(args, params):
    raise RuntimeError("something broke\nsecond line")


def _parser():
    from stages._common import stage_parser

    return stage_parser("test stage")


def test_unexpected_errors_are_one_line_and_point_to_debug(repo, capsys, monkeypatch):
    monkeypatch.delenv("DIET_DEBUG", raising=False)
    capsys.readouterr()
    code = run_stage(_boom, _parser(), ["--params", str(repo / "params.yaml")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "second line" not in err
    assert "error: unexpected RuntimeError: something broke" in err and "--debug" in err and "DIET_DEBUG=1" in err


def test_debug_flag_and_variable_show_the_traceback(repo, monkeypatch):
    with pytest.raises(RuntimeError, match="something broke"):
        run_stage(_boom, _parser(), ["--params", str(repo / "params.yaml"), "--debug"])
    monkeypatch.setenv("DIET_DEBUG", "1")
    with pytest.raises(ConfigError, match="params file not found"):
        run_stage(_boom, _parser(), ["--params", str(repo / "missing.yaml")])


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: about 5 s
def test_stage_as_a_process_prints_no_traceback(repo):
    path = repo / "masks/mask.json"
    path.write_text(path.read_text()[:50])
    before = snapshot(repo)
    argv = [str(a) for a in argv_of(repo, "prune")]
    out = subprocess.run([sys.executable, "-m", "stages.prune", *argv], cwd=PROJECT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: mask " in out.stderr and "not valid JSON" in out.stderr
    assert "fix: select the mask again; in the pipeline: `dvc repro select`" in out.stderr
    assert snapshot(repo) == before


@pytest.mark.parametrize("name", ["score", "prune"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(repo, capsys, monkeypatch, name):
    """The output's folder is a file: refused before the model is even loaded (its weights are not read)."""
    import diet.checkpoint

    (repo / "blocked").write_text("a file where a folder should be")
    argv = argv_of(repo, name)
    argv[argv.index("--out") + 1] = repo / "blocked" / "out"
    monkeypatch.setattr(diet.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(diet.checkpoint, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    fails_unchanged(repo, name, argv, capsys, "cannot write the output", "blocked is a file, not a folder",
                    "nothing was computed yet")


def test_a_disk_without_room_for_the_pruned_model_is_refused_before_the_work(repo, capsys, monkeypatch):
    """prune needs about the base model's weights times (1 - sparsity) free: with less, refused before the
    model is loaded, naming both sizes."""
    import shutil

    import diet.checkpoint

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    monkeypatch.setattr(diet.checkpoint, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    fails_unchanged(repo, "prune", argv_of(repo, "prune"), capsys, "cannot write the output", "MiB free",
                    "free disk space (or point the output elsewhere), then rerun; nothing was computed yet")


def test_a_write_that_fails_names_the_file_and_how_to_retry(repo, capsys, monkeypatch):
    import diet.scorefile

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(repo / "scores/t1.safetensors"))

    monkeypatch.setattr(diet.scorefile, "save_tensors", full_disk)
    fails_unchanged(repo, "score", argv_of(repo, "score"), capsys, "No space left on device: ",
                    "t1.safetensors", "free disk space, then rerun `dvc repro`")


def test_ctrl_c_on_a_stage_prints_one_line_and_changes_nothing(repo):
    """SIGINT while the score stage works (here: still loading torch inside its main): one line, exit 130 within
    seconds, no traceback, nothing half-written: no file changed but the stage's own outputs, each complete if
    written (a library that swallows the KeyboardInterrupt in a bare ``except`` lets the stage finish; it still
    exits 130, so DVC records nothing)."""
    import signal
    import time

    before = snapshot(repo)
    argv = [str(a) for a in argv_of(repo, "score")]
    proc = subprocess.Popen([sys.executable, "-m", "stages.score", *argv], cwd=PROJECT, stderr=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "DVC_STAGE": "score@t1"})
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 30
    while proc.poll() is None and time.time() < deadline and "libtorch" not in maps.read_text():
        time.sleep(0.02)           # the stage imports torch inside its main: interrupt it there, mid-import
    assert proc.poll() is None, "the stage ended before it could be interrupted"
    start = time.time()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1]
    assert time.time() - start < 15    # about a second on an idle machine; a shared CI machine is slower
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("interrupted: ")]
    assert len(said) == 1 and said[0].startswith("interrupted: score@t1;"), err[-2000:]
    assert "rerun `dvc repro` to resume" in said[0].lower()
    after = snapshot(repo)
    changed = {f for f in before.keys() | after.keys() if before.get(f) != after.get(f)}
    assert changed <= {"scores/t1.safetensors", "scores/t1.json"}, changed
    if changed:
        from diet.scorefile import read_scores

        assert read_scores(repo / "scores/t1.safetensors")   # complete: its payload checksum holds


# --- flow arguments -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "x y", ".hidden"])
def test_check_tasks_refuses_bad_names(tmp_path, name):
    from flows.repo import check_tasks

    with pytest.raises(DietError) as e:
        check_tasks(tmp_path, ["t1", name])
    assert f"{name!r} is not a valid task name" in e.value.problem and "letters, digits" in e.value.problem


@pytest.mark.parametrize("command", [["push", "--tasks", "t1,../x"], ["pull", "--tasks", "../x"]])
def test_cli_tasks_argument_refuses_bad_names(tmp_path, capsys, command):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main([*command, "--repo", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "argument --tasks: task name '../x' is not a valid task name" in err and "letters, digits" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_run_refuses_a_bad_task_in_set(tmp_path, capsys):
    from flows.cli import main

    repo = tmp_path / "flowrepo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("tasks: [t1]\n")
    before = snapshot(repo)
    assert main(["run", "--repo", str(repo), "--set", "tasks=[../x]"]) == 2
    err = capsys.readouterr().err
    assert "error: task name '../x' is not a valid task name" in err and "fix: rename the task" in err and "Traceback" not in err
    assert snapshot(repo) == before


def test_cli_run_refuses_a_bad_value_in_set_before_params_change(tmp_path, capsys):
    from flows.cli import main
    from tests.repo_fixture import make_tiny_repo

    root = make_tiny_repo(tmp_path)
    before = snapshot(root)
    for value, needle in (("1.5", "prune.sparsity = 1.5 is not a number in (0, 1)"),
                          (".nan", "prune.sparsity = nan"), ("[mlp]", "prune.sparsity = ['mlp']")):
        capsys.readouterr()
        assert main(["run", "--repo", str(root), "--set", f"prune.sparsity={value}"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "params.yaml with --set applied" in err and "Traceback" not in err, err
    capsys.readouterr()
    assert main(["run", "--repo", str(root), "--set", "merge.weights={t1: .inf}"]) == 2
    assert "merge.weights.t1 = inf" in capsys.readouterr().err
    assert snapshot(root) == before, "a refused --set changed a file"


def test_cli_pull_refuses_an_unknown_task_before_writing_the_remote(tmp_path, capsys):
    from flows.cli import main
    from tests.repo_fixture import make_tiny_repo

    root = make_tiny_repo(tmp_path)
    before = snapshot(root)
    assert main(["pull", "--repo", str(root), "--tasks", "nosuch", "--add-remote", str(tmp_path / "remote")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nosuch'" in err and "Traceback" not in err, err
    assert snapshot(root) == before, "a refused pull changed a file (.dvc/config?)"


@pytest.mark.parametrize("sets, needle", [
    (["--cron", "not a cron"], "error: cron = 'not a cron' is not a valid schedule: "),
    (["--cron", "0 2 * * *", "--config", "TZ"], "error: cron = '0 2 * * *' is not a valid schedule: "),
])
def test_cli_serve_refuses_a_bad_schedule_before_any_server(tmp_path, capsys, monkeypatch, sets, needle):
    """A cron expression or timezone Prefect cannot read is refused with the fix, not as a traceback, before a
    server is asked for (PREFECT_API_URL here names none)."""
    import flows.cli

    config = tmp_path / "schedule.yaml"
    config.write_text("name: nightly\ntimezone: Mars/Olympus\ncron: '0 2 * * *'\n")
    sets = [str(config) if s == "TZ" else s for s in sets]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert flows.cli.main(["serve", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and 'fix: write five cron fields, e.g. cron: "0 2 * * *"' in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--workers", "0"], "argument --workers: 0 is below 1"),
    (["run", "--retries", "-1"], "argument --retries: -1 is below 0"),
    (["sweep", "--jobs", "two"], "argument --jobs: expected a whole number, got 'two'"),
])
def test_cli_counts_are_checked_as_arguments(tmp_path, capsys, argv, needle):
    """Counts of workers, retries and jobs are refused by the argument parser (exit 2), before anything runs."""
    import flows.cli

    with pytest.raises(SystemExit) as stop:
        flows.cli.main([*argv, "--repo", str(tmp_path)])
    assert stop.value.code == 2 and needle in capsys.readouterr().err
