"""The sweep through DVC's experiment queue: points run in parallel in temporary copies of the repo while the
workspace, params.yaml, dvc.lock and HEAD stay as they are (``-m slow``: a few minutes on 2 cores)."""

import atexit
import os
import shutil
import tempfile

# Prefect reads its home once, at import: give the tests their own before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diet-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from flows.repo import RAN, FlowError, read_run_log  # noqa: E402
from tests.repo_fixture import dvc, dvc_env, git, make_tiny_repo  # noqa: E402


def test_run_log_lines_name_their_experiment(tmp_path):
    log = tmp_path / "runs.jsonl"
    log.write_text('{"stage": "merge", "pid": 1, "experiment": "a"}\n{"stage": "merge", "pid": 2, "experiment": "b"}\n'
                   '{"stage": "prune", "pid": 3, "experiment": "b"}\n{"stage": "model", "pid": 4}\n')
    assert read_run_log(log) == ["merge", "prune", "model"]
    assert read_run_log(log, "b") == ["merge", "prune"]
    assert read_run_log(log, "c") == []


def test_record_run_names_the_experiment(tmp_path, monkeypatch):
    import json

    from stages._common import record_run

    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv("DIET_RUN_LOG", str(log))
    monkeypatch.setenv("DVC_STAGE", "merge")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    record_run()
    monkeypatch.setenv("DVC_EXP_NAME", "vote-s0.2-x")
    record_run()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert "experiment" not in lines[0] and lines[1]["experiment"] == "vote-s0.2-x"


def test_bad_mode_and_jobs_are_refused():
    from flows.experiments import check_mode

    assert check_mode("queue", 2) == 2 and check_mode("workspace", 1) == 1
    with pytest.raises(FlowError, match="sweep mode 'parallel' is unknown") as e:
        check_mode("parallel", 2)
    assert "queue, workspace" in e.value.fix
    for jobs in (0, -1, 1.5, True, None):
        with pytest.raises(FlowError, match="at least one worker"):
            check_mode("queue", jobs)


def _state(repo: Path) -> dict:
    """What a sweep must leave alone: params.yaml, dvc.lock, HEAD and git's view of the working tree."""
    return {"params": (repo / "params.yaml").read_bytes(), "lock": (repo / "dvc.lock").read_bytes(),
            "head": git(repo, "rev-parse", "HEAD"), "status": git(repo, "status", "--porcelain")}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory):
    """A tiny project whose pipeline ran at sparsity 0.2 and was committed."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("queue"))
    subprocess.run([dvc(), "repro"], cwd=repo, env=dvc_env(), check=True, capture_output=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pipeline run at sparsity 0.2")
    return repo


@pytest.mark.slow
def test_queued_sweep_runs_points_in_parallel_and_leaves_the_workspace(committed_repo, prefect_harness, monkeypatch,
                                                                       tmp_path):
    import json

    import pandas as pd

    import flows.experiments as sweep
    from flows.sweep import sweep_flow
    from flows.sweep_report import report
    from flows.tables import CSV, MARKDOWN

    repo = committed_repo
    before = _state(repo)
    during = []
    real_succeeded = sweep.succeeded

    def watched(root, names):  # polled while the queue runs: the workspace must not move meanwhile
        during.append(_state(repo))
        return real_succeeded(root, names)

    monkeypatch.setattr(sweep, "succeeded", watched)
    out = sweep_flow(repo=str(repo), sparsities=[0.2, 0.3], methods=["vote", "vote+bias"], mode="queue", jobs=2)

    assert during and all(s == before for s in during)
    table = pd.read_csv(repo / CSV)
    assert _state(repo) == before                     # the sweep's table and plot lie in git-ignored folders
    assert set(out["shared"].values()) == {"cached"}                  # every shared stage was already cached
    assert [(e["method"], e["sparsity"]) for e in out["experiments"]] == [
        ("vote", 0.2), ("vote", 0.3), ("vote+bias", 0.2), ("vote+bias", 0.3)]
    for e in out["experiments"]:
        ran = {s for s, st in e["stages"].items() if st == RAN}
        if (e["method"], e["sparsity"]) == ("vote", 0.2):  # the committed run: DVC restores every stage but
            assert ran <= {"check"}, e       # the params check may rerun in the experiment (about 2 s)
        else:
            assert ran and ran <= {"check", "merge", "select", "prune", "evaluate@t1", "evaluate@t2", "perplexity",
                                   "export", "report"}, e                      # never a score stage
    assert table["sparsity"].tolist() == [0.2, 0.3, 0.2, 0.3]
    assert table["recover"].tolist() == ["none", "none", "bias", "bias"]   # read from each experiment's params
    assert (table["achieved_sparsity"] - table["sparsity"]).abs().max() < 0.05   # each row is its own experiment
    assert table["acc"].between(0, 1).all()
    # paired intervals from the experiments' per-item results: every row against the dense model
    assert table["acc_vs_dense"].notna().all()
    assert (table["acc_vs_dense"] - (table["acc"] - json.loads((repo / "results/sweep-dense.json").read_text())
                                     ["mean"]["acc"])).abs().max() < 1e-9
    assert (table["acc_vs_dense_low"] <= table["acc_vs_dense"]).all()
    assert (table["acc_vs_dense"] <= table["acc_vs_dense_high"]).all()
    items = json.loads((repo / "results/sweep-items.json").read_text())
    assert set(items["rows"]) == set(table["experiment"]) and set(items["dense"]) == {"t1", "t2"}
    assert "| vote+bias |" in (repo / MARKDOWN).read_text()
    states = sweep.experiment_states(repo)
    assert {states[e]["state"] for e in table["experiment"]} == {"success"}
    # the same table again straight from the finished experiments (a sweep whose flow was stopped)
    sweep_id = table["experiment"][0].rsplit("-", 1)[-1]
    report(repo, experiments=[f"*-{sweep_id}"], out=tmp_path / "again")
    again = pd.read_csv(tmp_path / "again" / "sweep.csv").set_index("experiment").loc[table["experiment"]]
    for column in ("recover", "acc", "acc_norm", "perplexity", "acc_vs_dense", "acc_vs_dense_low"):
        assert again[column].tolist() == table[column].tolist(), column
    with pytest.raises(FlowError, match="no finished experiment matches 'nope-\\*'"):
        report(repo, experiments=["nope-*"])


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_over_dimension_groups_and_an_ablation(committed_repo, prefect_harness, monkeypatch, tmp_path):
    """``groups``: one experiment per combination of pruned groups (prune.groups), rows labelled with their
    groups and sized in total parameters; ``vary``: per point one more experiment with a params change, compared
    with the point without it, and read back as such from the finished experiments; benchmarks/latency.py
    loads those experiments' pruned checkpoints. An experiment that fails in the queue is queued again once
    (``retries``), from the params it was first queued with."""
    import sys

    import pandas as pd

    import flows.experiments as sweep
    from flows.sweep import sweep_flow
    from flows.sweep_report import report
    from flows.tables import CSV, MARKDOWN

    repo = committed_repo
    before = _state(repo)
    real_run_queue, calls = sweep.run_queue, []

    def one_fails_once(root, names, *args, **kwargs):  # as DVC's run-cache race fails one experiment at times
        states = real_run_queue(root, names, *args, **kwargs)
        calls.append(list(names))
        if len(calls) == 1:
            subprocess.run([dvc(), "exp", "remove", names[-1]], cwd=root, env=dvc_env(), check=True,
                           capture_output=True)
            states[names[-1]] = {"state": "failed", "rev": None}
        return states

    monkeypatch.setattr(sweep, "run_queue", one_fails_once)
    out = sweep_flow(repo=str(repo), sparsities=[0.15], methods=["vote"], groups=["attention", "mlp+attention"],
                     vary=["merge.normalize=rank"], params={"select.multiple": {"mlp": 8, "attention": 1}},
                     mode="queue", jobs=2)
    assert len(calls) == 2 and calls[1] == [calls[0][-1]]          # the failed experiment alone, queued again
    assert _state(repo) == before
    assert [e["method"] for e in out["experiments"]] == [
        "vote [attention]", "vote [attention] merge.normalize=rank", "vote [mlp+attention]",
        "vote [mlp+attention] merge.normalize=rank"]
    table = pd.read_csv(repo / CSV)
    assert table["groups"].tolist() == ["attention", "attention", "mlp+attention", "mlp+attention"]
    assert table["setting"].fillna("").tolist() == ["", "merge.normalize=rank"] * 2
    assert (table["achieved_sparsity"] - 0.15).abs().max() < 0.05 and table["acc_vs_dense"].notna().all()
    ablation = table[table["setting"].notna()]
    assert ablation["acc_vs_default"].notna().all() and table[table["setting"].isna()]["acc_vs_default"].isna().all()
    assert (ablation["acc_vs_default"].to_numpy() - (ablation["acc"].to_numpy() -
            table[table["setting"].isna()]["acc"].to_numpy())).max() < 1e-9      # against its own groups' default
    md = (repo / MARKDOWN).read_text()
    assert "| vote [attention] |" in md and "total params (M)" in md and "Δ acc vs default" in md
    for e in out["experiments"]:
        assert not any(s.startswith("score") for s, st in e["stages"].items() if st == RAN), e
    # the same rows and settings, read back from the finished experiments alone
    sweep_id = table["experiment"][0].rsplit("-", 1)[-1]
    report(repo, experiments=[f"*-{sweep_id}"], out=tmp_path / "again")
    again = pd.read_csv(tmp_path / "again" / "sweep.csv").set_index("experiment").loc[table["experiment"]]
    assert again["setting"].fillna("").tolist() == table["setting"].fillna("").tolist()
    assert again["acc_vs_default"].fillna(9).tolist() == table["acc_vs_default"].fillna(9).tolist()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import latency

    variants = latency.experiment_variants(repo, ["vote-attention-s0.15-*", "vote-mlp_attention-s0.15-*"], tmp_path)
    assert [v["name"] for v in variants] == ["vote [attention]", "vote [mlp+attention]"]
    for v, row in zip(variants, table[table["setting"].isna()].to_dict("records")):
        assert v["experiment"] == row["experiment"] and (v["path"] / "config.json").is_file()
        assert set(v["widths"]) == set(row["groups"].split("+"))
        assert latency.parameter_counts(v["model"])["total"] == row["params_total"]
        lo, hi = v["widths"]["attention"]
        assert 1 <= lo <= hi <= 2 and lo < 2                  # a KV group of the tiny model's two went somewhere


@pytest.mark.slow
def test_leave_one_task_out_evaluates_each_held_out_task_alone(committed_repo, prefect_harness):
    import pandas as pd

    from flows.loto import CSV, HELD_OUT, MARKDOWN, loto_flow, loto_report

    repo = committed_repo
    before = _state(repo)
    # another evaluation size: the shared step reruns prepare@ and evaluate_dense@ in the workspace (a new
    # dvc.lock), and queueing stages files in git's index; both must be put back
    out = loto_flow(repo=str(repo), methods=["vote"], params={"evaluate": {"limit": 6}}, jobs=2)
    assert _state(repo) == before
    table = pd.read_csv(repo / CSV)
    held = table[table["calibration"] == HELD_OUT]
    assert sorted(held["task"]) == ["t1", "t2"] and len(table) == 4
    assert held["experiment"].nunique() == 2                   # one model per held-out task
    assert held["n"].tolist() == [6, 6] and held["acc"].between(0, 1).all()
    runs = {r["experiment"]: r for r in out["runs"]}
    for _, row in held.iterrows():
        ran = {s for s, st in runs[row["experiment"]]["stages"].items() if st == RAN}
        other = "t2" if row["task"] == "t1" else "t1"
        assert "merge" in ran and f"evaluate@{other}" not in ran and "report" not in ran, ran
        assert not any(s.startswith("score") for s in ran)
    md = (repo / MARKDOWN).read_text()
    assert "| vote (task held out) |" in md and "| vote (all tasks) |" in md and "| dense |" in md
    # the same table again from the finished experiments, nothing run
    (repo / MARKDOWN).unlink()
    loto_report(repo, [r["experiment"] for r in out["runs"]], ["vote"])
    assert (repo / MARKDOWN).read_text() == md


def test_cli_sweep_takes_mode_and_jobs():
    from flows.cli import build_parser

    p = build_parser()
    a = p.parse_args(["sweep", "--sparsities", "0.1,0.2"])
    assert (a.mode, a.jobs) == ("queue", None)
    a = p.parse_args(["sweep", "--mode", "workspace", "--jobs", "3"])
    assert (a.mode, a.jobs) == ("workspace", 3)
    with pytest.raises(SystemExit):
        p.parse_args(["sweep", "--mode", "parallel"])


@pytest.fixture
def fake_queue(monkeypatch, tmp_path):
    """run_queue against canned experiment states: ``states`` maps a name to its executor state."""
    import flows.experiments as sweep

    states: dict = {}
    started = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: started.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(sweep, "succeeded", lambda root, names: {n for n in names if states.get(n) == "success"})
    monkeypatch.setattr(sweep, "experiment_states",
                        lambda root, rev=None: {n: {"state": st, "rev": f"rev-{n}"} for n, st in states.items()})
    return sweep, states, started, tmp_path


def test_run_queue_returns_the_commits_of_finished_experiments(fake_queue):
    sweep, states, started, tmp_path = fake_queue
    states.update(a="success", b="success")
    out = sweep.run_queue(tmp_path, ["a", "b"], 3, tmp_path / "log", poll=0, check_every=0)
    assert out == {"a": {"state": "success", "rev": "rev-a"}, "b": {"state": "success", "rev": "rev-b"}}
    assert started[0][1:] == ["queue", "start", "--jobs", "3"]


def test_run_queue_names_a_failed_experiment(fake_queue):
    sweep, states, _, tmp_path = fake_queue
    states.update(a="success", b="failed")
    with pytest.raises(FlowError, match=r"experiment\(s\) b failed in DVC's queue") as e:
        sweep.run_queue(tmp_path, ["a", "b"], 2, tmp_path / "log", poll=0, check_every=0)
    assert "dvc queue logs b" in e.value.fix


def test_run_queue_can_return_failed_experiments_for_a_retry(fake_queue):
    sweep, states, _, tmp_path = fake_queue
    states.update(a="success", b="failed")
    out = sweep.run_queue(tmp_path, ["a", "b"], 2, tmp_path / "log", poll=0, check_every=0, allow_failed=True)
    assert out["b"]["state"] == "failed" and out["a"]["state"] == "success"
    with pytest.raises(FlowError, match=r"experiment\(s\) b failed"):
        sweep.check_finished(out, ["a", "b"])
    sweep.check_finished(out, ["a"])


def test_run_queue_gives_up_after_its_timeout(fake_queue):
    sweep, states, _, tmp_path = fake_queue
    states.update(a="running")
    with pytest.raises(FlowError, match="a had not finished after 0 s") as e:
        sweep.run_queue(tmp_path, ["a"], 2, tmp_path / "log", poll=0, check_every=0, timeout=0)
    assert "dvc queue kill" in e.value.fix


def _exp_show_failing(times: int, calls: list):
    """A stand-in for run_dvc whose first ``times`` calls fail as ``dvc exp show`` does when an executor's
    temporary copy disappears under it, then prints one running experiment."""
    from flows.repo import DvcCommandError, DvcResult

    listing = '[{"rev": "base", "experiments": [{"name": "a", "executor": {"state": "running"}, ' \
              '"revs": [{"rev": "c0ffee", "name": "a"}]}]}]'

    def run(args, root, **kw):
        calls.append(args)
        if len(calls) <= times:
            raise DvcCommandError(args, 1, "ERROR: failed to show experiments - directory "
                                           "'.dvc/tmp/exps/tmpx/.dvc' does not exist")
        return DvcResult(args, 0, listing, 0.1)
    return run


def test_experiment_states_retries_exp_show_while_an_executor_cleans_up(monkeypatch, tmp_path):
    import flows.experiments as sweep

    calls: list = []
    monkeypatch.setattr(sweep, "run_dvc", _exp_show_failing(2, calls))
    states = sweep.experiment_states(tmp_path, "base", wait=0)
    assert states == {"a": {"state": "running", "rev": "c0ffee"}}
    assert len(calls) == 3 and calls[0] == ["exp", "show", "--json", "--rev", "base"]


def test_experiment_states_raises_when_exp_show_keeps_failing(monkeypatch, tmp_path):
    import flows.experiments as sweep
    from flows.repo import DvcCommandError

    calls: list = []
    monkeypatch.setattr(sweep, "run_dvc", _exp_show_failing(10, calls))
    with pytest.raises(DvcCommandError, match="failed to show experiments"):
        sweep.experiment_states(tmp_path, attempts=3, wait=0)
    assert len(calls) == 3
