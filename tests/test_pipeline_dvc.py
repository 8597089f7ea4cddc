"""DVC caching of the DIET pipeline, checked with real `dvc repro` runs on a tiny git + DVC project.

One project is built and reproduced once per module (tests/repo_fixture.py); a test that changes it works
on its own copy. Assertions read DVC's own report ("Running stage ...", "didn't change, skipping") and the
content hashes of the artifacts.

The caching tests need that full reproduction (a few minutes on 2 cores, every stage starts torch): they are
marked slow, run them with ``-m slow``. The error-path tests build only what they need and run by default.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.repo_fixture import PROJECT, _rows as tiny_rows, dvc, dvc_env, make_tiny_repo

TASKS = ("t1", "t2")
PRUNED_OUTPUTS = ("models/pruned/config.json", "models/pruned/model.safetensors", "masks/mask.json",
                  "metrics/pruned.json")


@dataclass
class Repro:
    """One `dvc repro` call: exit code, combined output and the stages by what DVC did with them."""

    rc: int
    output: str
    ran: set[str]
    skipped: set[str]
    restored: set[str]


def repro(repo: Path, *args: str, threads: int = 1) -> Repro:
    """`dvc repro *args` with ``threads`` kernel threads per stage (OMP_NUM_THREADS)."""
    p = subprocess.run([dvc(), "repro", *args], cwd=repo, env=dvc_env({"OMP_NUM_THREADS": str(threads)}),
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    out = p.stdout

    def found(pattern: str) -> set[str]:
        return set(re.findall(pattern, out))

    return Repro(p.returncode, out, ran=found(r"Running stage '([^']+)'"),
                 skipped=found(r"Stage '([^']+)' didn't change, skipping"),
                 restored=found(r"Stage '([^']+)' is cached - skipping run"))


def ok(r: Repro) -> Repro:
    assert r.rc == 0, f"dvc repro failed ({r.rc}):\n{r.output[-4000:]}"
    return r


def all_stages(repo: Path) -> set[str]:
    """Every stage instance of the repo's dvc.yaml, `foreach` stages expanded over params `tasks`."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    tasks = yaml.safe_load((repo / "params.yaml").read_text())["tasks"]
    names = set()
    for name, stage in spec.items():
        if "foreach" in stage:
            assert stage["foreach"] == "${tasks}", f"{name} loops over {stage['foreach']}, not the task list"
            names.update(f"{name}@{t}" for t in tasks)
        else:
            names.add(name)
    return names


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(repo: Path, *parts: str) -> dict[str, str]:
    """sha256 of every file under each of ``parts`` (files or folders), by path relative to ``repo``."""
    out = {}
    for part in parts:
        p = repo / part
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.update({str(f.relative_to(repo)): sha256(f) for f in files})
    assert out, f"no files under {parts}"
    return out


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    values = yaml.safe_load(path.read_text())
    for section, value in sections.items():
        values[section] = {**values[section], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(values, sort_keys=False))


@dataclass
class Built:
    repo: Path
    first: Repro
    hashes: dict[str, str]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The tiny project after one full `dvc repro`; tests that change it use ``work_copy``."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("dvc"), tasks=TASKS)
    first = repro(repo)
    return Built(repo, first, hashes(repo, "models", "scores", "merged", "masks", "metrics", "data/tasks"))


@pytest.fixture
def work_copy(built, tmp_path) -> Path:
    """A private copy of the reproduced project (git, DVC cache and lock file included)."""
    dest = tmp_path / "repo"
    shutil.copytree(built.repo, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_first_repro_builds_everything_and_second_runs_nothing(built):
    repo, first = built.repo, ok(built.first)
    stages = all_stages(repo)
    assert first.ran == stages
    for rel in PRUNED_OUTPUTS:
        assert (repo / rel).is_file(), rel
    assert set(lock(repo)) == stages

    second = ok(repro(repo))
    assert second.ran == set() and second.restored == set()
    assert second.skipped == stages
    assert "Data and pipelines are up to date." in second.output
    assert hashes(repo, "models", "scores", "merged", "masks", "metrics", "data/tasks") == built.hashes


@pytest.mark.slow
def test_changing_sparsity_reruns_only_the_sparsity_stages(built, work_copy):
    repo = work_copy
    lock_before = lock(repo)
    kept = hashes(repo, "models/base", "scores", "baselines", "data/tasks", "results/dense", "metrics/dense.json")
    set_params(repo, prune={"sparsity": 0.4})

    r = ok(repro(repo))
    assert r.ran == {"check", "merge", "select", "prune", *(f"evaluate@{t}" for t in TASKS), "perplexity", "export",
                     "report"}
    assert r.skipped == all_stages(repo) - r.ran
    assert not any(s.startswith(("score@", "prepare@")) for s in r.ran | r.restored)

    assert hashes(repo, "models/base", "scores", "baselines", "data/tasks", "results/dense", "metrics/dense.json") == kept
    for stage in all_stages(repo) - r.ran:
        assert lock(repo)[stage] == lock_before[stage], stage
    assert sha256(repo / "masks/mask.json") != built.hashes["masks/mask.json"]
    assert sha256(repo / "models/pruned/model.safetensors") != built.hashes["models/pruned/model.safetensors"]
    mask = json.loads((repo / "masks/mask.json").read_text())
    assert mask["target_sparsity"] == 0.4


@pytest.mark.slow
def test_switching_to_the_refit_reruns_no_score_and_no_dense_evaluation(built, work_copy):
    repo = work_copy
    lock_before = lock(repo)
    set_params(repo, prune={"recover": "refit", "refit_samples": 4})

    r = ok(repro(repo))
    # merge reads prune.recover for an early check and writes the same priorities: select does not rerun
    assert r.ran == {"check", "merge", "prune", *(f"evaluate@{t}" for t in TASKS), "perplexity", "export", "report"}
    assert not any(s.startswith(("score", "prepare@", "evaluate_dense@")) for s in r.ran | r.restored)
    assert "perplexity_dense" not in r.ran
    for stage in all_stages(repo) - r.ran:
        assert lock(repo)[stage] == lock_before[stage], stage
    assert sha256(repo / "masks/mask.json") == built.hashes["masks/mask.json"]
    assert sha256(repo / "models/pruned/model.safetensors") != built.hashes["models/pruned/model.safetensors"]
    manifest = json.loads((repo / "models/pruned/manifest.json").read_text())
    assert manifest["recover"] == "refit" and manifest["refit"]["n_samples"] == 4 * len(TASKS)


@pytest.mark.slow
def test_changing_the_evaluation_size_keeps_every_score(built, work_copy):
    """Scores depend on the calibration file only: a new evaluate.limit re-prepares but never re-scores."""
    repo = work_copy
    lock_before = lock(repo)
    kept = ("scores", "baselines", "merged", "masks", "models", *(f"data/tasks/{t}/calib.jsonl" for t in TASKS))
    set_params(repo, evaluate={"limit": 5})

    r = ok(repro(repo))
    # prune depends on the score files, which pin the calibration samples the refit reads: it does not rerun
    expected = {f"{s}@{t}" for s in ("prepare", "evaluate_dense", "evaluate") for t in TASKS}
    assert r.ran == expected | {"check", "report"}
    assert lock(repo)["prune"] == lock_before["prune"]
    assert not any(s.startswith("score") for s in r.ran | r.restored)
    assert hashes(repo, *kept) == hashes(built.repo, *kept)
    for t in TASKS:
        assert lock(repo)[f"score@{t}"] == lock_before[f"score@{t}"]
        assert len((repo / f"data/tasks/{t}/eval.jsonl").read_text().splitlines()) == 5
    assert json.loads((repo / "results/pruned/summary.json").read_text())["tasks"][TASKS[0]]["n"] == 5


def readme_task_recipe() -> tuple[str, str]:
    """README's "Add a task" example: (task name, the task file exactly as README prints it)."""
    readme = (PROJECT / "README.md").read_text()
    m = re.search(r"```yaml\n# data/tasks/(?P<name>[\w-]+)\.yaml\n(?P<body>.*?)```", readme, re.S)
    assert m, "README's 'Add a task' section has no task-file example"
    return m["name"], f"# data/tasks/{m['name']}.yaml\n{m['body']}"


@pytest.mark.slow
def test_readme_add_a_task_recipe_runs_only_the_new_task(built, work_copy):
    """README's recipe, typed literally: the user's files stay, and only the new task's stages plus the
    task-merging and pruned-model stages run; no other task is re-prepared, rescored or re-evaluated dense."""
    repo = work_copy
    name, task_file = readme_task_recipe()
    (repo / "data" / "tasks" / f"{name}.yaml").write_text(task_file)
    files = yaml.safe_load(task_file)["source"]["datasets"]["data_files"]
    for split, rel in files.items():                     # yes/no rows with passage, question, answer
        path = (repo / "data" / "tasks" / rel).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows("t2", 16, split)))
    user_files = {p: sha256(p) for p in ((repo / "data" / "tasks" / rel).resolve() for rel in files.values())}
    set_params(repo, tasks=[*TASKS, name])
    lock_before = lock(repo)

    r = ok(repro(repo))
    new_task = {f"prepare@{name}", f"score@{name}", f"evaluate_dense@{name}", f"evaluate@{name}"}
    pruned_side = {"check", "merge", "select", "prune", *(f"evaluate@{t}" for t in TASKS), "perplexity", "export", "report"}
    assert new_task <= r.ran <= new_task | pruned_side, r.ran
    assert {"merge", "report"} <= r.ran
    assert r.skipped >= {"model", "score_generic", "perplexity_dense",
                         *(f"{s}@{t}" for s in ("prepare", "score", "evaluate_dense") for t in TASKS)}
    assert {p: sha256(p) for p in user_files} == user_files              # the user's data are untouched
    untouched = ("scores/t1.safetensors", "scores/t2.safetensors", "data/tasks/t1", "data/tasks/t2",
                 "results/dense/tasks/t1.json", "results/dense/tasks/t2.json")
    assert hashes(repo, *untouched) == hashes(built.repo, *untouched)
    after = lock(repo)
    for t in TASKS:
        assert after[f"score@{t}"] == lock_before[f"score@{t}"]
    assert json.loads((repo / "merged/merge.json").read_text())["tasks"] == [*TASKS, name]
    assert set(json.loads((repo / "results/pruned/summary.json").read_text())["tasks"]) == {*TASKS, name}


def test_task_data_inside_a_pipeline_output_is_refused_and_kept(tmp_path):
    """Source files in data/tasks/<task>/ (the prepare stage's output) are refused before anything is written."""
    repo = make_tiny_repo(tmp_path, tasks=("t1",))
    data = repo / "data" / "tasks" / "t1"
    shutil.move(str(repo / "data" / "tiny" / "t1"), str(data))
    spec = yaml.safe_load((repo / "data" / "tasks" / "t1.yaml").read_text())
    spec["source"]["datasets"]["data_files"] = {"train": "t1/train.jsonl", "validation": "t1/validation.jsonl"}
    (repo / "data" / "tasks" / "t1.yaml").write_text(yaml.safe_dump(spec))
    before = hashes(repo, "data/tasks/t1")

    r = repro(repo, "prepare@t1")
    assert r.rc != 0 and "Traceback" not in r.output
    assert "lies inside" in r.output and "an output of the pipeline" in r.output, r.output[-2000:]
    assert "fix: move the task's source files to a folder of their own" in r.output
    assert hashes(repo, "data/tasks/t1") == before                        # nothing deleted, nothing added


@pytest.mark.slow
def test_score_and_select_are_deterministic(built, work_copy):
    repo = work_copy
    score = ok(repro(repo, "-f", "-s", "score@t1"))
    assert score.ran == {"score@t1"}
    assert sha256(repo / "scores/t1.safetensors") == built.hashes["scores/t1.safetensors"]
    assert sha256(repo / "scores/t1.json") == built.hashes["scores/t1.json"]

    select = ok(repro(repo, "-f", "-s", "select"))
    assert select.ran == {"select"}
    assert sha256(repo / "masks/mask.json") == built.hashes["masks/mask.json"]
    assert lock(repo) == lock(built.repo)


#: the stages whose results are expensive: their cache keys name a computation version, never code
VERSIONED = ("model", "prepare", "score", "score_generic", "evaluate_dense", "evaluate", "perplexity_dense",
             "perplexity")


def dvc_status(repo: Path) -> set[str]:
    """The stages `dvc status --json` marks as changed."""
    p = subprocess.run([dvc(), "status", "--json"], cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return set(json.loads(p.stdout or "{}"))


@pytest.mark.slow
def test_editing_every_module_reruns_no_expensive_stage(built, work_copy):
    """Append a comment to every module under diet/ and stages/ and commit: `dvc status` marks the stages that
    take seconds (their code deps changed) and no expensive one; `dvc repro` reruns those, their outputs are
    the same bytes, so the pruned model's evaluations do not rerun either."""
    from tests.repo_fixture import git

    repo = work_copy
    assert ok(repro(repo)).ran == set()
    for path in sorted([*(repo / "diet").rglob("*.py"), *(repo / "stages").rglob("*.py")]):
        path.write_bytes(path.read_bytes() + b"\n# edited\n")
    git(repo, "commit", "-qam", "comments everywhere")
    changed = dvc_status(repo)
    assert changed == {"check", "merge", "select", "prune", "export", "report"}, sorted(changed)
    assert not any(s.split("@")[0] in VERSIONED for s in changed)
    again = ok(repro(repo))
    assert again.ran == {"check", "merge", "select", "prune", "export", "report"}, sorted(again.ran)
    assert hashes(repo, "models", "scores", "merged", "masks", "metrics", "data/tasks") == built.hashes


@pytest.mark.slow
def test_changing_a_computation_version_reruns_exactly_its_stages(built, work_copy):
    """Bumping SCORE marks every score@ and score_generic and no other expensive stage: the dense
    evaluations, the model and the prepared tasks keep theirs."""
    repo = work_copy
    versions = repo / "diet" / "versions.py"
    text = versions.read_text()
    versions.write_text(text.replace("\nSCORE = ", "\nSCORE = 1000 + ", 1))
    changed = dvc_status(repo)
    cheap = {"merge", "select", "prune", "export"}   # they import diet/versions.py as code, and take seconds
    assert changed - cheap == {*(f"score@{t}" for t in TASKS), "score_generic"}, sorted(changed)


def stage_cmd(repo: Path, stage: str, task: str | None = None) -> list[str]:
    """The command of ``stage`` (of instance ``stage@task``) as dvc.yaml declares it."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    cmd = shlex.split((spec["do"] if "foreach" in spec else spec)["cmd"].replace("${item}", task or ""))
    assert cmd[:3] == ["python", "-m", f"stages.{stage}"], cmd
    return cmd


def run_in_process(repo: Path, stage: str, task: str | None = None) -> None:
    """Run a stage's entry point in this interpreter (no interpreter start-up), from ``repo``."""
    module = importlib.import_module(f"stages.{stage}")
    assert module.run_stage(module.main, module.parser(), stage_cmd(repo, stage, task)[3:]) == 0, stage


def test_merge_refuses_scores_from_another_model(tmp_path, monkeypatch):
    from tests.tiny import tiny_model, tiny_tokenizer

    repo = make_tiny_repo(tmp_path, tasks=TASKS)
    monkeypatch.chdir(repo)
    run_in_process(repo, "model")
    for t in TASKS:
        run_in_process(repo, "prepare", t)
        run_in_process(repo, "score", t)
    shutil.rmtree(repo / "models/base")  # another model, same architecture, other weights
    tiny_model("llama", seed=1).save_pretrained(repo / "models/base")
    tiny_tokenizer().save_pretrained(repo / "models/base")

    p = subprocess.run([sys.executable, *stage_cmd(repo, "merge")[1:]], cwd=repo, env=dvc_env(),
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr
    assert "Traceback" not in err
    m = re.search(r"error: scores/t1\.safetensors was scored on model ([0-9a-f]{64}), "
                  r"but the current model is ([0-9a-f]{64})", err)
    assert m, err
    assert m[1] != m[2]
    assert "fix: score task 't1' again on the current model; in the pipeline: `dvc repro -f score@t1`" in err
    assert not (repo / "merged").exists()
    assert not [f.name for f in repo.iterdir() if f.name.startswith(".merged")]


def test_bad_sparsity_fails_repro_with_a_config_error(tmp_path):
    repo = make_tiny_repo(tmp_path, tasks=TASKS, params={"prune": {"sparsity": 1.5}})

    r = repro(repo)
    assert r.rc != 0
    assert "error: prune.sparsity = 1.5 is not a number in (0, 1)" in r.output
    assert "fix: set the share of decoder-layer parameters to remove" in r.output
    assert "failed to reproduce 'check'" in r.output  # the root stage validates the whole params file
    assert r.ran == {"check"}
    assert "Traceback" not in r.output
    assert not (repo / "models/base").exists()


@pytest.mark.slow
@pytest.mark.parametrize("edit, needle", [
    ({"prune": {"sparsity": 2}}, "error: prune.sparsity = 2 is not a number in (0, 1)"),
    ({"prune": {"sparsity": float("nan")}}, "error: prune.sparsity = nan is not a number in (0, 1)"),
    ({"prune": {"recovr": "bias"}}, "error: unknown params key 'prune.recovr'"),
    ({"merge": {"weights": {"t1": float("inf")}}}, "merge.weights"),
    ({"tasks": ["t1", "nosuch"]}, "error: unknown task 'nosuch': no file data/tasks/nosuch.yaml"),
])
def test_a_bad_params_edit_is_refused_before_any_output_is_deleted(built, work_copy, edit, needle):
    """The root `check` stage refuses the edit first: no stage's outputs are emptied, and putting params.yaml
    back leaves `dvc status` clean, with nothing to rerun."""
    repo = work_copy
    before = hashes(repo, "models", "scores", "merged", "masks", "metrics", "data")
    original = (repo / "params.yaml").read_text()
    set_params(repo, **edit)

    r = repro(repo)
    assert r.rc != 0 and r.ran == {"check"}, r.output[-3000:]
    assert needle in r.output and "fix: " in r.output and "Traceback" not in r.output
    assert hashes(repo, "models", "scores", "merged", "masks", "metrics", "data") == before

    (repo / "params.yaml").write_text(original)
    status = subprocess.run([dvc(), "status", "--json"], cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout


@pytest.mark.slow
def test_a_lock_entry_naming_another_tasks_scores_is_refused_at_merge(work_copy):
    """A bad merge of dvc.lock gives score@t1 the hash of t2's score file: `dvc checkout` restores t2's scores
    under t1's name and `dvc repro` takes them as cached, but merge refuses them, naming the task they hold."""
    repo = work_copy
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {t: lock["stages"][f"score@{t}"]["outs"] for t in TASKS}
    for mine, theirs in zip(outs["t1"], outs["t2"]):
        mine.update({k: theirs[k] for k in ("md5", "size")})
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    (repo / "scores/t1.safetensors").unlink()
    assert subprocess.run([dvc(), "checkout", "score@t1"], cwd=repo, env=dvc_env(), capture_output=True).returncode == 0
    merged = hashes(repo, "merged")
    r = repro(repo)
    assert r.rc != 0 and "score@t1" not in r.ran, r.output[-3000:]
    assert "scores/t1.safetensors holds the scores of task 't2', not of task 't1'" in r.output, r.output[-3000:]
    assert "dvc repro -f score@t1" in r.output and "Traceback" not in r.output
    assert not (repo / "merged").exists() or hashes(repo, "merged") == merged   # DVC removes it before merge runs


@pytest.mark.slow
def test_diet_flow_run_with_nothing_to_do_answers_from_dvc_status(built, work_copy, monkeypatch, capsys):
    """A reproduced project: `diet-flow run` finds nothing to do in `dvc status` and answers with one table of
    cached stages, without a Prefect server or flow; a --set that changes a value does start the flow."""
    import flows.cli

    def no_server():
        raise AssertionError("a Prefect server was started for a run with nothing to do")

    monkeypatch.setattr(flows.cli, "flow_server", no_server)
    assert flows.cli.main(["run", "--repo", str(work_copy)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {s: "cached" for s in all_stages(work_copy)}
    assert err.strip() == f"nothing to do: dvc status finds all {len(all_stages(work_copy))} stages up to date; " \
                          "no flow was started"
    assert flows.cli.main(["run", "--repo", str(work_copy), "--target", "select"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"check", "model", "merge", "select", "score_generic",
                                                       *(f"{s}@{t}" for s in ("prepare", "score") for t in TASKS)}

    with pytest.raises(AssertionError, match="a Prefect server was started"):
        flows.cli.main(["run", "--repo", str(work_copy), "--set", "prune.sparsity=0.3"])
    assert yaml.safe_load((work_copy / "params.yaml").read_text())["prune"]["sparsity"] == 0.2  # not yet written
