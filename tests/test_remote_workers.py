"""Workers without a shared disk (flows/remote_workers.py).

Fast tests: every bad input (no DVC remote, uncommitted tracked or dependency files, a commit the git URL
does not serve, --git-url without --no-shared-disk) fails with a FlowError naming the fix, before any stage
runs. The slow test runs the tiny pipeline on a Dask LocalCluster whose two workers each work in a clone of
their own, cloned from a bare git repository and exchanging data through a local-folder DVC remote.
"""

import atexit
import os
import shutil
import tempfile

# Prefect reads its home once, at import: give the tests their own before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diet-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from flows.repo import CACHED, RAN, FlowError, lock_stages, stage_graph  # noqa: E402
from tests.repo_fixture import clone, git, make_tiny_repo, write_task  # noqa: E402


def coordinator(tmp_path: Path, remote: bool = True) -> tuple[Path, Path]:
    """A tiny project served by a bare git repository (what workers clone) and a clone of it (the
    coordinator), with a local-folder DVC remote as its default remote."""
    origin = make_tiny_repo(tmp_path, name="origin")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(origin), str(bare)], check=True)
    coord = clone(bare, tmp_path / "coordinator")
    if remote:
        from flows.share import add_remote

        (tmp_path / "dvc-remote").mkdir()
        add_remote(coord, str(tmp_path / "dvc-remote"))   # changes .dvc/config, which need not be committed
    return coord, bare


def cli(*args: str) -> int:
    from flows.cli import main

    return main(list(args))


def test_no_remote_fails_with_the_fix(tmp_path, capsys):
    from flows.remote_workers import check_workspace

    coord, bare = coordinator(tmp_path, remote=False)
    with pytest.raises(FlowError, match="no default DVC remote") as e:
        check_workspace(coord, str(bare))
    assert "diet-flow push --add-remote URL" in e.value.fix
    assert cli("run", "--repo", str(coord), "--no-shared-disk", "--git-url", str(bare)) == 2
    err = capsys.readouterr().err
    assert "error: no default DVC remote" in err and "fix: add one" in err
    assert not (coord / "dvc.lock").exists()


def test_uncommitted_code_or_deps_fail_params_and_lock_travel(tmp_path, capsys):
    from flows.remote_workers import check_workspace, prepare

    coord, bare = coordinator(tmp_path)
    params = yaml.safe_load((coord / "params.yaml").read_text())
    (coord / "params.yaml").write_text(yaml.safe_dump({**params, "prune": {**params["prune"], "sparsity": 0.3}}))
    (coord / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    found = check_workspace(coord, str(bare))          # params.yaml, dvc.lock, .dvc/config: they travel
    assert found["commit"] == git(coord, "rev-parse", "HEAD").strip() and found["remote"] == "shared"
    assert Path(found["remote_url"]) == tmp_path / "dvc-remote"

    module = coord / "stages" / "merge.py"
    module.write_text(module.read_text() + "\n# edited\n")
    with pytest.raises(FlowError, match=r"uncommitted changes to tracked files: stages/merge.py") as e:
        check_workspace(coord, str(bare))
    assert "git push" in e.value.fix and "git stash" in e.value.fix
    assert cli("run", "--repo", str(coord), "--no-shared-disk", "--git-url", str(bare)) == 2
    assert "stages/merge.py" in capsys.readouterr().err
    git(coord, "checkout", "stages/merge.py")

    write_task(coord, "t3")                            # a task file the commit lacks
    params["tasks"] = ["t1", "t2", "t3"]
    (coord / "params.yaml").write_text(yaml.safe_dump(params))
    check_workspace(coord, str(bare))                  # untracked files are only refused as stage deps
    with pytest.raises(FlowError, match=r"stage dependencies not committed to git: data/tasks/t3.yaml"):
        prepare(coord, ["prepare@t3"], str(bare))
    assert not list(tmp_path.joinpath("dvc-remote").iterdir())


def test_commit_missing_from_the_git_url_fails(tmp_path, capsys):
    from flows.remote_workers import check_workspace, prepare

    coord, bare = coordinator(tmp_path)
    (coord / "notes.txt").write_text("a commit the workers cannot fetch\n")
    git(coord, "add", "notes.txt")
    git(coord, "commit", "-qm", "local only")
    head = git(coord, "rev-parse", "HEAD").strip()
    with pytest.raises(FlowError, match=f"commit {head[:12]} .HEAD. is not on any branch or tag of {bare}") as e:
        check_workspace(coord, str(bare))
    assert f"git push {bare} HEAD:refs/heads/<branch>" in e.value.fix
    with pytest.raises(FlowError, match="cannot read the git repository"):
        check_workspace(coord, str(tmp_path / "no-such.git"))
    assert cli("run", "--repo", str(coord), "--no-shared-disk", "--git-url", str(bare)) == 2
    assert "is not on any branch or tag" in capsys.readouterr().err
    check_workspace(coord)                             # the default URL, the repository itself, has it
    git(coord, "push", "-q", "origin", "HEAD:refs/heads/main")
    spec = prepare(coord, ["model"], str(bare), workdir="/scratch/diet")
    assert (spec.commit, spec.git_url, spec.workdir, spec.lock) == (head, str(bare), "/scratch/diet", None)
    assert spec.params == (coord / "params.yaml").read_text()


def test_cli_options_of_the_no_shared_disk_mode(tmp_path, capsys):
    from flows.cli import build_parser

    a = build_parser().parse_args(["run", "--runner", "dask", "--workers", "4", "--no-shared-disk",
                                   "--address", "tcp://head:8786", "--git-url", "ssh://git/diet.git",
                                   "--workdir", "/scratch/diet"])
    assert (a.shared_disk, a.git_url, a.workdir, a.address) == (False, "ssh://git/diet.git", "/scratch/diet",
                                                                "tcp://head:8786")
    assert build_parser().parse_args(["run"]).shared_disk
    coord, bare = coordinator(tmp_path)
    assert cli("run", "--repo", str(coord), "--git-url", str(bare)) == 2
    assert "--git-url and --workdir apply to workers without a shared disk" in capsys.readouterr().err


def test_worker_clone_folders_are_per_worker_and_exclusive(tmp_path):
    from flows.remote_workers import CloneSpec, worker_clone

    spec = CloneSpec(git_url="/srv/git/diet.git", commit="0" * 40, params="", lock=None, remote="shared",
                     remote_url="/srv/dvc", workdir=str(tmp_path))
    with worker_clone(spec) as (first, name):
        with worker_clone(spec) as (second, same):    # another task of the same worker, meanwhile
            assert name == same and first != second
            assert first.parent == second.parent and first.parent.parent == tmp_path
            assert first.parent.name.startswith("diet-") and second.name == f"{name}.1"
    with worker_clone(spec) as (again, _):
        assert again == first                          # free again: reused, with its DVC cache


@pytest.mark.slow
@pytest.mark.integration
def test_dask_workers_without_a_shared_disk(tmp_path, monkeypatch):
    """Two Dask worker processes, each in its own clone of a bare git repository, exchange every input and
    output through a local DVC remote. The coordinator ends with every stage's output and an up-to-date
    dvc.lock; every stage ran exactly once, on a worker, with the coordinator's uncommitted params.yaml (a new
    sparsity); a second run computes nothing."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_flow

    coord, bare = coordinator(tmp_path)
    runs = tmp_path / "runs.jsonl"
    monkeypatch.setenv("DIET_RUN_LOG", str(runs))
    workdir = tmp_path / "workers"
    stages = list(stage_graph(coord))
    with prefect_test_harness(server_startup_timeout=180):
        first = pipeline_flow(repo=str(coord), params={"prune": {"sparsity": 0.35}}, task_runner="dask",
                              workers=2, shared_disk=False, git_url=str(bare), workdir=str(workdir))
        assert first == {s: RAN for s in stages}, first
        rows = [json.loads(line) for line in runs.read_text().splitlines()]
        assert sorted(r["stage"] for r in rows) == sorted(stages)   # each stage computed once
        workers = {r["worker"] for r in rows}
        folders = {r["worker"]: {x["clone"] for x in rows if x["worker"] == r["worker"]} for r in rows}
        assert len(workers) == 2, rows                 # both workers computed something
        assert all(len(f) == 1 for f in folders.values()), folders   # one clone per worker ...
        clones = [Path(next(iter(f))) for f in folders.values()]
        assert clones[0] != clones[1] and all(c.is_relative_to(workdir) for c in clones)  # ... its own

        from dvc.repo import Repo

        with Repo(str(coord)) as dvc_repo:
            assert dvc_repo.status() == {}             # dvc.lock describes the workspace, every output present
        assert set(lock_stages(coord)) == set(stages)
        for t in ("t1", "t2"):
            assert (coord / "scores" / f"{t}.safetensors").is_file()
        assert (coord / "models" / "pruned" / "config.json").is_file()
        # the uncommitted params.yaml travelled to the workers
        assert json.loads((coord / "metrics" / "pruned.json").read_text())["sparsity"] == pytest.approx(0.35, abs=0.05)
        assert (tmp_path / "dvc-remote" / "runs").is_dir()   # the run-cache is shared through the remote
        status = git(coord, "status", "--porcelain").splitlines()
        # as after a local run: dvc.lock written, .gitignore entries for the outputs outside ignored folders
        assert sorted(line[3:] for line in status) == [".dvc/config", "data/tasks/.gitignore", "dvc.lock",
                                                       "params.yaml"], status

        lock = (coord / "dvc.lock").read_text()
        second = pipeline_flow(repo=str(coord), task_runner="dask", workers=2, shared_disk=False,
                               git_url=str(bare), workdir=str(workdir))
        assert second == {s: CACHED for s in stages}, second
        assert len(runs.read_text().splitlines()) == len(stages)   # nothing computed again
        assert (coord / "dvc.lock").read_text() == lock


def test_errors_come_back_whole_from_a_worker():
    """A task's exception travels pickled from a Dask worker: problem, fix and DVC's output survive."""
    import pickle

    from flows.repo import DvcCommandError

    e = pickle.loads(pickle.dumps(FlowError("no remote", "add one")))
    assert (type(e), e.problem, e.fix) == (FlowError, "no remote", "add one")
    d = pickle.loads(pickle.dumps(DvcCommandError(["repro", "merge"], 255, "ERROR: failed to reproduce 'merge'")))
    assert (d.command, d.returncode, d.output) == (["repro", "merge"], 255, "ERROR: failed to reproduce 'merge'")
    assert "failed to reproduce 'merge'" in str(d) and d.fix
