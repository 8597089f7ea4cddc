"""Prefect flows over DVC.

Fast tests drive the flows against a fake ``dvc`` (canned output, recorded timings) and run one real stage
through real DVC. The integration tests (``-m slow``, about 15 minutes on 2 cores) run the whole pipeline
with real DVC on tiny git + DVC repos (tests/repo_fixture.py): full run, cached rerun, sparsity change, Dask
fan-out, sweep, cross-team reuse through a remote, and a scheduled run on a real Prefect server.
"""

import atexit
import os
import shutil
import tempfile

# Prefect reads its home once, at import: give the tests their own before anything imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diet-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from flows import repo as flows_repo  # noqa: E402
from flows.repo import (CACHED, RAN, DvcCommandError, DvcResult, FlowError, check_tasks,  # noqa: E402
                        downstream, ensure_repo, flatten_overrides, merged_params, read_run_log, stage_graph,
                        stage_status, stages_reading, topological, upstream, write_params)
from tests.repo_fixture import clone, dvc, dvc_env, make_tiny_repo  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- DVC output, stage graph, params: pure functions -----------------------------------------------------

GRAPH = {"model": [], "prepare@t1": [], "prepare@t2": [], "score@t1": ["model", "prepare@t1"],
         "score@t2": ["model", "prepare@t2"], "merge": ["score@t1", "score@t2"], "evaluate": ["merge"]}


def test_run_log_tells_ran_from_cached(tmp_path):
    log = tmp_path / "runs.jsonl"
    log.write_text('{"stage": "score@t1", "pid": 1}\n{"stage": "merge", "pid": 2}\n{"stage": "score@t1", "pid": 3}\n')
    assert read_run_log(log) == ["score@t1", "merge"]
    assert read_run_log(tmp_path / "none.jsonl") == []
    res = DvcResult(["repro"], 0, "", 1.0, ran=("score@t1",))
    assert stage_status(res, ["model", "score@t1"]) == {"model": CACHED, "score@t1": RAN}


def test_stage_graph_order_and_reach():
    graph = GRAPH
    order = topological(graph)
    assert sorted(order) == sorted(graph)
    for stage, parents in graph.items():
        assert all(order.index(p) < order.index(stage) for p in parents)
    assert upstream(graph, ["score@t2"]) == {"score@t2", "model", "prepare@t2"}
    assert downstream(graph, ["score@t1"]) == {"score@t1", "merge", "evaluate"}
    with pytest.raises(FlowError, match="cycle"):
        topological({"a": ["b"], "b": ["a"]})


def test_project_sweep_splits_shared_from_swept_stages():
    """On the project's dvc.yaml, sparsity and method reach merge/select and what follows, never a score."""
    graph = {"model": [], "prepare@a": [], "score@a": ["model", "prepare@a"], "score_generic": ["model"],
             "evaluate_dense@a": ["model", "prepare@a"], "perplexity_dense": ["model"],
             "merge": ["score@a", "score_generic"], "select": ["merge"], "prune": ["select"],
             "evaluate@a": ["prune", "prepare@a"], "perplexity": ["prune"],
             "report": ["evaluate_dense@a", "perplexity_dense", "evaluate@a", "perplexity", "select"]}
    readers = stages_reading(PROJECT, graph, ["prune.sparsity", "merge.method"])
    assert readers == {"merge", "select", "prune", "report"}   # prune: merge.method picks the recovery means
    assert downstream(graph, readers) == {"merge", "select", "prune", "evaluate@a", "perplexity", "report"}


def test_overrides_nested_and_dotted():
    current = yaml.safe_load((PROJECT / "params.yaml").read_text())
    flat = flatten_overrides({"prune": {"sparsity": 0.3}, "merge.method": "mean", "tasks": ["a"],
                              "merge.weights": {"boolq": 0.5}})
    assert flat == {"prune.sparsity": 0.3, "merge.method": "mean", "tasks": ["a"], "merge.weights": {"boolq": 0.5}}
    merged = merged_params(current, flat)
    assert merged["prune"]["sparsity"] == 0.3 and merged["merge"]["method"] == "mean"
    assert merged["merge"]["weights"] == {"boolq": 0.5} and merged["tasks"] == ["a"]
    assert merged_params(current, {"merge.weights.rte": 2.0})["merge"]["weights"] == {"rte": 2.0}
    assert current["prune"]["sparsity"] != 0.3  # the input is not modified
    with pytest.raises(FlowError, match=r"unknown params key 'prune.sparsty'.*\n.*prune.sparsity"):
        merged_params(current, {"prune.sparsty": 0.3})
    with pytest.raises(FlowError, match="unknown params key 'prunning.sparsity'"):
        merged_params(current, {"prunning": {"sparsity": 0.3}})


def test_write_params_keeps_comments_and_order(tmp_path):
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    assert write_params(tmp_path, {"prune": {"sparsity": 0.2}}) == []  # unchanged value: file untouched
    assert (tmp_path / "params.yaml").read_text() == before
    assert write_params(tmp_path, {"prune.sparsity": 0.35, "tasks": ["boolq", "rte"]}) == ["prune.sparsity", "tasks"]
    after = (tmp_path / "params.yaml").read_text()
    data = yaml.safe_load(after)
    assert data["prune"]["sparsity"] == 0.35 and data["tasks"] == ["boolq", "rte"]
    assert "# share of decoder-layer parameters removed" in after
    assert [line for line in after.splitlines() if line.startswith("#")] == \
        [line for line in before.splitlines() if line.startswith("#")]
    assert list(data) == list(yaml.safe_load(before))


def test_flow_edits_change_only_the_edited_lines_of_params_and_the_lock(tmp_path):
    """params.yaml keeps its list indentation and its `null`s; dvc.lock keeps DVC's own style (lists at the key's
    indentation, empty nulls): a flow's edit differs from the file in the edited value alone."""
    from flows.repo import edited_yaml

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    assert "  - arc_easy" in before and "revision: null" in before
    write_params(tmp_path, {"prune.sparsity": 0.35})
    changed = [(a, b) for a, b in zip(before.splitlines(), (tmp_path / "params.yaml").read_text().splitlines())
               if a != b]
    assert len(before.splitlines()) == len((tmp_path / "params.yaml").read_text().splitlines())
    assert [(a.split("#")[0].strip(), b.split("#")[0].strip()) for a, b in changed] == \
        [("sparsity: 0.2", "sparsity: 0.35")]

    lock = (PROJECT / "dvc.lock").read_text()
    (tmp_path / "dvc.lock").write_text(lock)
    with edited_yaml(tmp_path / "dvc.lock") as doc:
        doc["stages"]["check"]["cmd"] += " --task-dir data/tasks"
    after = (tmp_path / "dvc.lock").read_text().splitlines()
    assert len(after) == len(lock.splitlines())
    assert [b for a, b in zip(lock.splitlines(), after) if a != b] == [
        "    cmd: python -m stages.check --out data/params.checked --task-dir data/tasks"]


def test_check_tasks_names_missing_and_available(tmp_path):
    (tmp_path / "data" / "tasks").mkdir(parents=True)
    for t in ("arc_easy", "boolq"):
        (tmp_path / "data" / "tasks" / f"{t}.yaml").write_text("source: {olmo: x}\n")
    check_tasks(tmp_path, ["boolq"])
    with pytest.raises(FlowError) as e:
        check_tasks(tmp_path, ["boolq", "arc_eazy", "nope"])
    msg = str(e.value)
    assert "'arc_eazy' (did you mean 'arc_easy'?)" in msg and "'nope'" in msg and "data/tasks/nope.yaml" in msg
    assert "use one of: arc_easy, boolq" in msg


def test_ensure_repo_fails_fast(tmp_path):
    with pytest.raises(FlowError, match="is not a DVC repository"):
        ensure_repo(tmp_path)
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(FlowError, match="no dvc.yaml"):
        ensure_repo(tmp_path)
    with pytest.raises(FlowError, match="not found"):
        ensure_repo(tmp_path / "missing")


# --- a fake dvc: flows without real stages ---------------------------------------------------------------

FAKE_DVC = textwrap.dedent("""\
    #!{python}
    import os, sys, time
    args = sys.argv[1:]
    assert args[0] == "--wait-for-lock", args
    args = args[1:]
    log = os.path.join(os.getcwd(), "calls.log")
    if args[0] == "repro":
        stage = args[2]
        with open(log, "a") as f:
            f.write(f"start {{stage}} {{time.time()}}\\n")
        if stage == os.environ.get("FAKE_DVC_FAIL"):
            print(f"Running stage '{{stage}}':")
            sys.stderr.write("error: the model folder data/nope does not exist\\n")
            sys.stderr.write(f"ERROR: failed to reproduce '{{stage}}': failed to run: python -m x, exited with 2\\n")
            sys.exit(255)
        time.sleep(float(os.environ.get("FAKE_DVC_SLEEP", "0.5")))
        if stage in os.environ.get("FAKE_DVC_CACHED", "").split(","):
            print(f"Stage '{{stage}}' didn't change, skipping")
        else:
            with open(os.environ["DIET_RUN_LOG"], "a") as f:  # what a stage run by DVC does
                f.write('{{"stage": "%s"}}\\n' % stage)
        with open(log, "a") as f:
            f.write(f"end {{stage}} {{time.time()}}\\n")
    else:
        sys.exit(f"fake dvc: unexpected {{args}}")
""")


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A DVC-shaped folder with the stage graph GRAPH whose `dvc` answers `repro -s X` by sleeping."""
    repo = tmp_path / "fake"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "data" / "tasks").mkdir(parents=True)
    for t in ("t1", "t2"):
        (repo / "data" / "tasks" / f"{t}.yaml").write_text("source: {olmo: x}\n")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("# settings\ntasks:\n  - t1\n  - t2\nprune:\n  sparsity: 0.2  # share\n")
    exe = tmp_path / "fake-dvc"
    exe.write_text(FAKE_DVC.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setattr(flows_repo, "dvc_executable", lambda: str(exe))
    monkeypatch.setattr("flows.pipeline.stage_graph", lambda root: GRAPH)
    return repo


def read_calls(repo: Path) -> dict[str, tuple[float, float]]:
    t: dict[str, dict[str, float]] = {}
    for line in (repo / "calls.log").read_text().splitlines():
        kind, stage, at = line.split()
        t.setdefault(stage, {})[kind] = float(at)
    return {s: (v["start"], v.get("end", float("inf"))) for s, v in t.items()}


def test_repro_task_reports_status_and_surfaces_dvc_errors(fake_repo, monkeypatch):
    from prefect.logging import disable_run_logger

    from flows.pipeline import repro_stage

    monkeypatch.setenv("FAKE_DVC_SLEEP", "0")
    with disable_run_logger():
        assert repro_stage.fn(str(fake_repo), "merge")["status"] == RAN
        monkeypatch.setenv("FAKE_DVC_CACHED", "merge")
        assert repro_stage.fn(str(fake_repo), "merge")["status"] == CACHED
        monkeypatch.setenv("FAKE_DVC_FAIL", "merge")
        with pytest.raises(DvcCommandError) as e:
            repro_stage.fn(str(fake_repo), "merge")
    assert e.value.returncode == 255
    assert "the model folder data/nope does not exist" in str(e.value)
    assert "failed to reproduce 'merge'" in str(e.value)


def test_make_task_runner():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import make_task_runner

    assert isinstance(make_task_runner("threads", 3), ThreadPoolTaskRunner)
    assert type(make_task_runner("dask", 2)).__name__ == "DaskTaskRunner"
    with pytest.raises(FlowError, match="unknown task_runner"):
        make_task_runner("slurm")
    with pytest.raises(FlowError, match="workers"):
        make_task_runner("threads", 0)


def test_pipeline_fans_out_independent_stages_after_their_upstream(fake_repo, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("FAKE_DVC_SLEEP", "1.0")
    monkeypatch.setenv("FAKE_DVC_CACHED", "model")
    report = pipeline_flow(repo=str(fake_repo), params={"prune": {"sparsity": 0.3}}, workers=4)
    assert report == {"model": CACHED, "prepare@t1": RAN, "prepare@t2": RAN, "score@t1": RAN, "score@t2": RAN,
                      "merge": RAN, "evaluate": RAN}
    calls = read_calls(fake_repo)
    for stage, parents in GRAPH.items():  # every stage starts after all its upstream stages ended
        assert all(calls[p][1] <= calls[stage][0] for p in parents), (stage, calls)
    (a0, a1), (b0, b1) = calls["score@t1"], calls["score@t2"]
    assert a0 < b1 and b0 < a1, "independent score stages must overlap"
    (a0, a1), (b0, b1) = calls["prepare@t1"], calls["prepare@t2"]
    assert a0 < b1 and b0 < a1, "independent prepare stages must overlap"
    params = (fake_repo / "params.yaml").read_text()
    assert "sparsity: 0.3  # share" in params and params.startswith("# settings")


def test_pipeline_targets_and_failure(fake_repo, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("FAKE_DVC_SLEEP", "0")
    assert list(pipeline_flow(repo=str(fake_repo), targets=["score@t2"])) == ["model", "prepare@t2", "score@t2"]
    with pytest.raises(FlowError, match="unknown stage"):
        pipeline_flow(repo=str(fake_repo), targets=["score@t9"])
    (fake_repo / "calls.log").unlink()
    monkeypatch.setenv("FAKE_DVC_FAIL", "score@t1")
    with pytest.raises(DvcCommandError, match="the model folder data/nope does not exist"):
        pipeline_flow(repo=str(fake_repo), retries=0)
    calls = read_calls(fake_repo)
    assert "merge" not in calls and "evaluate" not in calls  # nothing downstream of the failure ran


def test_flows_fail_fast_on_bad_input(fake_repo, tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow
    from flows.sweep import sweep_flow

    before = (fake_repo / "params.yaml").read_text()
    with pytest.raises(FlowError, match=r"unknown task 'tx'.*\n.*use one of: t1, t2"):
        pipeline_flow(repo=str(fake_repo), params={"tasks": ["t1", "tx"]})
    with pytest.raises(FlowError, match="unknown params key 'prune.sparsty'"):
        pipeline_flow(repo=str(fake_repo), params={"prune.sparsty": 0.3})
    assert (fake_repo / "params.yaml").read_text() == before  # nothing written on bad input
    assert not (fake_repo / "calls.log").exists()  # and nothing ran
    with pytest.raises(FlowError, match="is not a DVC repository"):
        pipeline_flow(repo=str(tmp_path))
    with pytest.raises(FlowError, match="is not a DVC repository"):
        sweep_flow(repo=str(tmp_path))
    with pytest.raises(FlowError, match="outside"):
        sweep_flow(repo=str(fake_repo), sparsities=[0.2, 1.5])


# --- sweep table, schedule config, CLI -------------------------------------------------------------------

def fake_metrics(acc: float, sparsity: float) -> dict:
    return {"mean": {"acc": acc, "acc_norm": acc - 0.1}, "perplexity": 20.0 + 10 * sparsity,
            "params": {"total": 1000, "non_embedding": 800, "decoder": int(800 * (1 - sparsity))},
            "sparsity": sparsity, "method": "vote",
            "tasks": {"t1": {"acc": acc + 0.1, "acc_norm": acc}, "t2": {"acc": acc - 0.1, "acc_norm": acc}}}


def fake_run(point, metrics: dict, dense: dict, items: dict | None = None) -> dict:
    """A finished sweep point as ``run_points`` returns it, its files served from memory."""
    files = {"results/pruned/summary.json": json.dumps(metrics), "results/dense/summary.json": json.dumps(dense),
             "params.yaml": json.dumps({"prune": {"recover": point.recover or "none"}})}
    for kind, by_task in (items or {}).items():
        for task, rows in by_task.items():
            files[f"results/{kind}/tasks/{task}.json"] = json.dumps({"items": rows})

    def read(path):
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    return {"point": point, "experiment": f"{point.label}-{point.sparsity}", "stages": {}, "read": read}


def test_sweep_rows_refuse_runs_whose_dense_models_saw_other_items():
    from flows.points import Point
    from flows.tables import sweep_rows

    def items(correct):
        return {"pruned": {"t1": [{"id": 0, "acc": 1, "acc_norm": 1}]},
                "dense": {"t1": [{"id": 0, "acc": correct, "acc_norm": correct}]}}

    same = [fake_run(Point("vote", s), fake_metrics(0.5, s), fake_metrics(0.7, 0.0), items(1)) for s in (0.1, 0.2)]
    rows, by_experiment, dense_items, _, _ = sweep_rows(same, ["t1"])
    assert len(rows) == 2 and dense_items == {"t1": {"0": [1.0, 1.0]}} and len(by_experiment) == 2
    other = fake_run(Point("mean", 0.2), fake_metrics(0.5, 0.2), fake_metrics(0.7, 0.0), items(0))
    with pytest.raises(FlowError, match="dense model's per-item results of experiment mean-0.2 differ from those "
                                        "of vote-0.1") as e:
        sweep_rows([*same, other], ["t1"])
    assert "same evaluate.limit" in e.value.fix


def test_sweep_results_table_markdown_plot(tmp_path):
    from flows.points import Point
    from flows.tables import CSV, MARKDOWN, PLOT, SWEEP_DENSE, write_results

    runs = [fake_run(Point(m, s), fake_metrics(0.6 - s, s), fake_metrics(0.7, 0.0))
            for m in ("vote", "mean") for s in (0.1, 0.3)]
    table, md, paths = write_results(tmp_path, runs, ["t1", "t2"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [CSV, MARKDOWN, PLOT, "results/sweep-items.json"]
    assert json.loads((tmp_path / SWEEP_DENSE).read_text()) == fake_metrics(0.7, 0.0)  # for later reports
    import pandas as pd

    csv = pd.read_csv(tmp_path / CSV)
    assert len(csv) == 4 and list(csv[["method", "sparsity"]].itertuples(index=False, name=None)) == \
        [("vote", 0.1), ("vote", 0.3), ("mean", 0.1), ("mean", 0.3)]
    assert csv["recover"].tolist() == ["none"] * 4
    assert csv["acc"].tolist() == pytest.approx([0.5, 0.3, 0.5, 0.3])
    assert csv["acc_t1"].tolist() == pytest.approx([0.6, 0.4, 0.6, 0.4])
    assert csv["params_decoder"].tolist() == [720, 560, 720, 560]
    assert {"perplexity", "acc_norm", "params_total", "experiment"} <= set(csv.columns)
    assert csv["acc_vs_dense"].isna().all()  # no per-item results in these runs: no paired intervals
    summary, per_task = md.split("## Per task")
    assert summary.count("\n| vote |") == 2 and "Dense model: acc 0.7000" in summary
    assert per_task.count("\n| vote |") == 2 and per_task.count("\n| dense |") == 2  # one table per sparsity
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wide = pd.read_csv((tmp_path / PLOT).with_suffix(".csv"))     # what `dvc plots show` draws
    assert list(wide.columns) == ["sparsity", "vote", "mean"]
    assert wide["sparsity"].tolist() == pytest.approx([0.0, 0.1, 0.3])  # the dense model at sparsity 0
    assert wide["vote"].tolist() == pytest.approx([0.7, 0.5, 0.3])


def test_schedule_config(tmp_path, monkeypatch):
    from flows.schedule import DEFAULT_CONFIG, load_schedule, serve_pipeline

    cfg = load_schedule()
    assert cfg.cron and cfg.interval is None and Path(cfg.parameters["repo"]).is_absolute()
    cfg = load_schedule(DEFAULT_CONFIG, interval=30, repo=str(tmp_path), name="hourly")
    assert (cfg.interval, cfg.cron, cfg.name) == (30, None, "hourly")
    assert cfg.parameters["repo"] == str(tmp_path.resolve()) and cfg.parameters["workers"] == 2
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\ncron: '* * * * *'\ninterval: 5\n")
    with pytest.raises(FlowError, match="exactly one"):
        load_schedule(bad)
    bad.write_text("name: x\ninterval: 5\nparameters: {workerz: 2}\n")
    with pytest.raises(FlowError, match="did you mean 'workers'"):
        load_schedule(bad)
    bad.write_text("name: x\ncronn: '* * * * *'\n")
    with pytest.raises(FlowError, match="unknown key 'cronn'"):
        load_schedule(bad)
    monkeypatch.setattr("flows.schedule.api_url", lambda: None)
    with pytest.raises(FlowError, match="need a Prefect server"):
        serve_pipeline(load_schedule())


def test_cli_parses_every_command():
    from flows.cli import build_parser, parse_sets

    assert parse_sets(["prune.sparsity=0.3", "tasks=[a, b]", "merge.method=mean"]) == \
        {"prune.sparsity": 0.3, "tasks": ["a", "b"], "merge.method": "mean"}
    with pytest.raises(FlowError):
        parse_sets(["sparsity"])
    p = build_parser()
    a = p.parse_args(["run", "--set", "prune.sparsity=0.3", "--runner", "dask", "--workers", "3", "--target", "merge"])
    assert (a.command, a.runner, a.workers, a.targets) == ("run", "dask", 3, ["merge"])
    assert p.parse_args(["sweep", "--sparsities", "0.1,0.5", "--methods", "vote,mean"]).sparsities == [0.1, 0.5]
    assert p.parse_args(["serve", "--interval", "60"]).interval == 60
    assert p.parse_args(["push", "--remote", "shared", "--tasks", "t1,t2"]).tasks == ["t1", "t2"]
    assert p.parse_args(["pull", "--all"]).all_stages
    for cmd in ("run", "sweep", "serve", "push", "pull"):
        out = subprocess.run([sys.executable, "-m", "flows.cli", cmd, "--help"], cwd=PROJECT,
                             capture_output=True, text=True)
        assert out.returncode == 0 and f"diet-flow {cmd}" in out.stdout


def test_flows_never_import_torch():
    """The flows share diet's light layers (errors, config, registry, markdown) and never load torch, transformers
    or a model."""
    light = ("diet.errors", "diet.config", "diet.registry", "diet.markdown")
    code = (f"LIGHT = {light!r}; "
            "import sys, flows.pipeline, flows.sweep, flows.share, flows.schedule, flows.cli, flows.repo, "
            "flows.remote_workers; "
            "flows.repo.check_task_names(['t1']); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "bad += [m for m in sys.modules if m.startswith('diet.') and m not in LIGHT]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT, check=True, env=dvc_env())


# --- integration: real DVC, real stages, tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, prefect_harness):
    """A tiny project, run once in full, one stage at a time (the sequential reference)."""
    from flows.pipeline import pipeline_flow

    repo = make_tiny_repo(tmp_path_factory.mktemp("pipeline"))
    report = pipeline_flow(repo=str(repo), workers=1)
    return repo, report


@pytest.mark.slow
def test_full_pipeline_produces_pruned_model_and_metrics(tiny_repo):
    repo, report = tiny_repo
    assert list(report) == topological(stage_graph(repo))
    assert set(report.values()) == {RAN}, report
    assert (repo / "models" / "pruned" / "config.json").is_file()
    assert list((repo / "models" / "pruned").glob("*.safetensors"))
    dense, pruned = (json.loads((repo / "results" / n / "summary.json").read_text()) for n in ("dense", "pruned"))
    assert 0.0 <= pruned["mean"]["acc"] <= 1.0 and set(pruned["tasks"]) == {"t1", "t2"}
    assert pruned["params"]["decoder"] < dense["params"]["decoder"]
    assert pruned["sparsity"] == pytest.approx(0.2, abs=0.05)
    for t in ("t1", "t2"):
        assert (repo / "scores" / f"{t}.safetensors").is_file()


@pytest.mark.slow
def test_second_run_is_all_cached(tiny_repo):
    from flows.pipeline import pipeline_flow

    repo, first = tiny_repo
    again = pipeline_flow(repo=str(repo), workers=2)
    assert again == {stage: CACHED for stage in first}


@pytest.mark.slow
@pytest.mark.integration
def test_changing_sparsity_reruns_no_score(tiny_repo):
    from flows.pipeline import pipeline_flow

    repo, _ = tiny_repo
    scores = {t: sha256(repo / "scores" / f"{t}.safetensors") for t in ("t1", "t2")}
    report = pipeline_flow(repo=str(repo), params={"prune": {"sparsity": 0.35}}, workers=2)
    ran = {s for s, st in report.items() if st == RAN}
    assert ran == {"check", "merge", "select", "prune", "evaluate@t1", "evaluate@t2", "perplexity", "export",
                   "report"}, report
    assert yaml.safe_load((repo / "params.yaml").read_text())["prune"]["sparsity"] == 0.35
    assert json.loads((repo / "metrics" / "pruned.json").read_text())["sparsity"] == pytest.approx(0.35, abs=0.05)
    assert scores == {t: sha256(repo / "scores" / f"{t}.safetensors") for t in ("t1", "t2")}


def test_failing_stage_surfaces_dvc_error_text(tmp_path, prefect_harness):
    from flows.pipeline import pipeline_flow

    repo = make_tiny_repo(tmp_path, params={"model": {"source": "data/no_such_model"}})
    with pytest.raises(DvcCommandError) as e:
        pipeline_flow(repo=str(repo), targets=["model"], retries=0)
    msg = str(e.value)
    assert "failed to reproduce 'model'" in msg
    assert "no_such_model" in msg and "error:" in msg  # the stage's own message, through DVC


@pytest.fixture(scope="module")
def dask_repo(tmp_path_factory, prefect_harness):
    """A second tiny project whose scores were computed on a Dask LocalCluster of two worker processes."""
    from flows.pipeline import pipeline_flow

    repo = make_tiny_repo(tmp_path_factory.mktemp("dask"))
    report = pipeline_flow(repo=str(repo), task_runner="dask", workers=2, targets=["score@t1", "score@t2"])
    return repo, report


@pytest.mark.slow
def test_dask_fan_out_equals_sequential_run(dask_repo, tiny_repo):
    repo, report = dask_repo
    assert report == {"check": RAN, "model": RAN, "prepare@t1": RAN, "prepare@t2": RAN, "score@t1": RAN,
                      "score@t2": RAN}
    sequential, _ = tiny_repo
    for t in ("t1", "t2"):
        assert sha256(repo / "scores" / f"{t}.safetensors") == sha256(sequential / "scores" / f"{t}.safetensors")


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_computes_each_score_once(dask_repo):
    from flows.sweep import sweep_flow
    from flows.tables import CSV, MARKDOWN, PLOT

    repo, first = dask_repo
    assert first["score@t1"] == first["score@t2"] == RAN  # computed once, before the sweep
    before = {n: (repo / n).read_bytes() for n in ("params.yaml", "dvc.lock")}
    out = sweep_flow(repo=str(repo), sparsities=[0.1, 0.2, 0.3], methods=["vote"], workers=2)
    assert out["shared"]["score@t1"] == out["shared"]["score@t2"] == CACHED
    assert out["shared"]["evaluate_dense@t1"] == out["shared"]["evaluate_dense@t2"] == RAN
    assert [(e["method"], e["sparsity"]) for e in out["experiments"]] == [("vote", 0.1), ("vote", 0.2), ("vote", 0.3)]
    for e in out["experiments"]:
        assert {s for s, st in e["stages"].items() if st == RAN} <= {
            "check", "merge", "select", "prune", "evaluate@t1", "evaluate@t2", "perplexity", "export", "report"}, e
        assert e["stages"]["merge"] == RAN
    import pandas as pd

    table = pd.read_csv(repo / CSV)
    assert len(table) == 3 and table["sparsity"].tolist() == [0.1, 0.2, 0.3]
    assert table["params_decoder"].is_monotonic_decreasing and table["acc"].between(0, 1).all()
    assert {"acc_t1", "acc_t2", "perplexity", "params_total"} <= set(table.columns)
    summary, per_task = (repo / MARKDOWN).read_text().split("## Per task")
    assert summary.count("\n| vote |") == 3 and per_task.count("\n| vote |") == 3
    assert (repo / PLOT).stat().st_size > 1000
    assert {n: (repo / n).read_bytes() for n in ("params.yaml", "dvc.lock")} == before


@pytest.mark.slow
@pytest.mark.integration
def test_second_team_reuses_scores_through_a_remote(tmp_path, prefect_harness, monkeypatch):
    """Team A (one thread) runs the pipeline and pushes; team B (two threads) pulls and runs the whole pipeline
    with a task of its own: no score stage of A's tasks runs again, nor score_generic, nor A's dense
    evaluations (a fresh clone at another thread count reproduces the lock:
    test_two_teams_share_scores_whether_or_not_the_lock_was_committed)."""
    from flows.pipeline import pipeline_flow
    from flows.share import add_remote, pull_scores, push_scores

    origin = make_tiny_repo(tmp_path, tasks=("t1", "t2"), extra_tasks=("t3",), name="origin")
    remote = tmp_path / "remote"
    remote.mkdir()
    team_a = clone(origin, tmp_path / "a")
    add_remote(team_a, str(remote))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a = pipeline_flow(repo=str(team_a), workers=1)
    assert set(a.values()) == {RAN}
    subprocess.run(["git", "add", "-A"], cwd=team_a, check=True)
    subprocess.run(["git", "commit", "-qm", "team A's pipeline run"], cwd=team_a, check=True)
    pushed = push_scores(team_a)
    assert {"score@t1", "score@t2", "score_generic", "evaluate_dense@t1", "perplexity_dense"} <= set(pushed["targets"])

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    team_b = clone(team_a, tmp_path / "b")
    add_remote(team_b, str(remote))
    b = pull_scores(repo=str(team_b), tasks=["t1", "t2", "t3"])     # adds t3 to params.yaml
    assert yaml.safe_load((team_b / "params.yaml").read_text())["tasks"] == ["t1", "t2", "t3"]
    ran_b = {s for s, st in b.items() if st == RAN}
    assert ran_b == {"prepare@t3", "score@t3", "evaluate_dense@t3"}, b   # only what nobody computed
    full = pipeline_flow(repo=str(team_b), workers=1)
    ran_full = {s for s, st in full.items() if st == RAN}
    assert not any(s.startswith("score") for s in ran_full), full
    assert not ran_full & {"evaluate_dense@t1", "evaluate_dense@t2", "perplexity_dense"}, full
    for t in ("t1", "t2"):
        assert sha256(team_b / "scores" / f"{t}.safetensors") == sha256(team_a / "scores" / f"{t}.safetensors")


@pytest.fixture(scope="module")
def origin_1thread(tmp_path_factory):
    """A project (a model wide enough for threads to matter) whose committed dvc.lock was made at 1 thread."""
    from tests.repo_fixture import WIDE, git

    origin = make_tiny_repo(tmp_path_factory.mktemp("origin"), tasks=("t1", "t2"), extra_tasks=("t3",),
                            name="origin", model=WIDE)
    r = subprocess.run([dvc(), "repro"], cwd=origin, env=dvc_env({"OMP_NUM_THREADS": "1"}), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "the pipeline's lock, made at 1 thread")
    return origin


def _repro(repo: Path, threads: int):
    from tests.test_pipeline_dvc import ok, repro

    return ok(repro(repo, threads=threads))


def _git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout


EXPENSIVE_PREFIXES = ("score@", "score_generic", "evaluate_dense@")


@pytest.mark.slow
@pytest.mark.parametrize("lock_committed", [True, pytest.param(False, marks=pytest.mark.integration)],
                         ids=["committed-lock", "no-lock"])
def test_two_teams_share_scores_whether_or_not_the_lock_was_committed(origin_1thread, tmp_path, prefect_harness,
                                                                    lock_committed):
    """Team A runs the pipeline at 2 threads and pushes without committing anything; team B clones, pulls and
    runs `dvc repro` at 1 thread: no score@, score_generic or evaluate_dense@ runs. With the committed lock
    (made at 1 thread) A's identical bytes are what it names; with no lock at all (a project that never
    committed one) B finds A's results through the pushed run-cache."""
    from flows.share import add_remote, pull_scores, push_scores
    from tests.repo_fixture import git

    origin = origin_1thread
    if not lock_committed:
        origin = clone(origin_1thread, tmp_path / "origin-nolock")
        git(origin, "rm", "-q", "dvc.lock")
        git(origin, "commit", "-qm", "no lock")
    remote = tmp_path / "remote"
    remote.mkdir()
    team_a = clone(origin, tmp_path / "a")
    _repro(team_a, 2)
    add_remote(team_a, str(remote))
    push_scores(team_a)                                      # diet-flow push --add-remote DIR
    # the remote went into .dvc/config and nothing else changed: with a committed lock (made at 1 thread), A's
    # run at 2 threads reproduced it byte for byte, as a fresh clone's `make run` must
    status = {line[3:] for line in _git_status(team_a).splitlines()}
    lock_diff = subprocess.run(["git", "diff", "dvc.lock"], cwd=team_a, capture_output=True, text=True).stdout
    assert status == {".dvc/config", *(() if lock_committed else ["dvc.lock"])}, (status, lock_diff[-6000:])
    in_head = subprocess.run(["git", "cat-file", "-e", "HEAD:dvc.lock"], cwd=team_a).returncode == 0
    assert in_head == lock_committed

    team_b = clone(origin, tmp_path / "b")
    add_remote(team_b, str(remote))
    pull_scores(repo=str(team_b))                            # diet-flow pull --add-remote DIR
    ran = _repro(team_b, 1).ran
    assert not [s for s in ran if s.startswith(EXPENSIVE_PREFIXES)], sorted(ran)
    for t in ("t1", "t2"):
        assert sha256(team_b / "scores" / f"{t}.safetensors") == sha256(team_a / "scores" / f"{t}.safetensors")


@pytest.mark.slow
def test_upgrading_keeps_a_users_own_task_scored(origin_1thread, tmp_path):
    """A clone with a task of its own (t3), scored and committed; main then changes only comments in every
    module; after merging it, `dvc repro` reruns no score@ and no evaluate_dense@."""
    from tests.repo_fixture import git

    user = clone(origin_1thread, tmp_path / "user")
    # the origin's DVC cache stands for the team's remote: the committed stages are restored, t3 is computed
    assert subprocess.run([dvc(), "cache", "dir", "--local", str(origin_1thread / ".dvc" / "cache")], cwd=user,
                          env=dvc_env({})).returncode == 0
    params = yaml.safe_load((user / "params.yaml").read_text())
    (user / "params.yaml").write_text(yaml.safe_dump({**params, "tasks": ["t1", "t2", "t3"]}, sort_keys=False))
    assert {"score@t3", "evaluate_dense@t3"} <= _repro(user, 2).ran
    git(user, "add", "-A")
    git(user, "commit", "-qm", "our own task t3")

    upstream = clone(origin_1thread, tmp_path / "upstream")
    for path in sorted([*(upstream / "diet").rglob("*.py"), *(upstream / "stages").rglob("*.py")]):
        path.write_text(path.read_text() + "\n# a comment of the new release\n")
    git(upstream, "commit", "-qam", "the new release: comments only")
    git(user, "pull", "-q", "--no-rebase", "--no-edit", str(upstream), "main")
    ran = _repro(user, 1).ran
    assert not [s for s in ran if s.startswith(("score@", "evaluate_dense@", "prepare@"))], sorted(ran)
    assert not ran & {"model", "score_generic", "perplexity_dense", "perplexity"} and "evaluate@t3" not in ran


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> int:
    """Signal the process group that ``proc`` leads; escalate to SIGKILL if it does not exit."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.mark.slow
def test_scheduled_run_fires_on_a_real_server(tmp_path):
    import httpx

    repo = make_tiny_repo(tmp_path)
    from flows.server import free_port

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dvc_env({"PREFECT_HOME": str(tmp_path / "prefect-home"),
                   "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                   "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                   "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH")) if p)})
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    served = None
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the Prefect server did not start"
            time.sleep(1)

        config = tmp_path / "schedule.yaml"
        config.write_text(yaml.safe_dump({"name": "diet-test", "interval": 5, "limit": 1, "parameters": {
            "repo": str(repo), "targets": ["model"], "workers": 1}}))
        serve_log = open(tmp_path / "serve.log", "w")
        served = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(config)], cwd=PROJECT,
                                  env={**env, "PREFECT_API_URL": api}, stdout=serve_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 240
        completed = []
        while not completed:
            assert served.poll() is None, (tmp_path / "serve.log").read_text()
            runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": [
                "COMPLETED", "FAILED", "CRASHED"]}}}}, timeout=10).json()
            assert not [r for r in runs if r["state_type"] != "COMPLETED"], runs
            completed = [r for r in runs if r["deployment_id"]]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(2)
        deployment = httpx.get(f"{api}/deployments/{completed[0]['deployment_id']}", timeout=10).json()
        assert deployment["name"] == "diet-test" and deployment["parameters"]["repo"] == str(repo)
    finally:
        if served is not None:
            _stop(served)
        _stop(server, signal.SIGTERM)
    assert served.returncode is not None and server.returncode is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)


def test_report_renders_per_task_tables(tmp_path):
    import pandas as pd

    from flows.sweep_report import report
    from flows.tables import metrics_row

    def metrics(a, b):
        return {"mean": {"acc": (a + b) / 2, "acc_norm": a}, "perplexity": 20.0, "sparsity": 0.2,
                "tasks": {"t1": {"acc": a, "acc_norm": a}, "t2": {"acc": b, "acc_norm": b}}}

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "dense").mkdir()
    (tmp_path / "results" / "dense" / "summary.json").write_text(json.dumps(metrics(0.6, 0.8)))
    rows = [{"method": m, "sparsity": s, **metrics_row(metrics(a, 0.5))}
            for m, s, a in [("vote", 0.2, 0.55), ("random", 0.2, 0.30), ("vote", 0.3, 0.45)]]
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "sweep.csv", index=False)
    md = report(tmp_path)
    assert (tmp_path / "results" / "sweep.md").read_text() == md
    assert md.count("| dense | 0.60 / 0.60 | 0.80 / 0.80 |") == 2  # once per sparsity table
    assert "| vote | 0.55 / 0.55 | 0.50 / 0.50 | 0.5250 |" in md
    assert "**Sparsity 0.2**" in md and "**Sparsity 0.3**" in md


def test_report_combines_sweeps(tmp_path):
    import pandas as pd

    from flows.sweep_report import report
    from flows.tables import metrics_row

    def row(method, sparsity, acc):
        m = {"mean": {"acc": acc, "acc_norm": acc}, "tasks": {"t1": {"acc": acc, "acc_norm": acc}}}
        return {"method": method, "sparsity": sparsity, **metrics_row(m)}

    pd.DataFrame([row("vote", 0.2, 0.5), row("random", 0.2, 0.3)]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame([row("vote", 0.3, 0.4)]).to_csv(tmp_path / "b.csv", index=False)
    md = report(tmp_path, csvs=[tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "out")
    combined = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert sorted(zip(combined["method"], combined["sparsity"])) == [("random", 0.2), ("vote", 0.2), ("vote", 0.3)]
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").stat().st_size > 0
    wide = pd.read_csv(tmp_path / "out" / "accuracy_vs_sparsity.csv")   # no dense metrics: no sparsity-0 row
    assert wide["sparsity"].tolist() == [0.2, 0.3] and wide["vote"].tolist() == [0.5, 0.4]
    assert wide["random"].iloc[0] == 0.3 and math.isnan(wide["random"].iloc[1])
    assert "**Sparsity 0.3**" in md and "| vote | 0.40 / 0.40 |" in md


def test_report_refuses_a_dense_row_of_another_evaluation_size(tmp_path):
    import pandas as pd

    from flows.repo import FlowError
    from flows.sweep_report import report
    from flows.tables import metrics_row

    def metrics(acc, n):
        return {"mean": {"acc": acc, "acc_norm": acc},
                "tasks": {"t1": {"acc": acc, "acc_norm": acc, "n": n}, "t2": {"acc": acc, "acc_norm": acc, "n": n}}}

    pd.DataFrame([{"method": "vote", "sparsity": 0.2, **metrics_row(metrics(0.5, 100))}]).to_csv(
        tmp_path / "a.csv", index=False)
    assert pd.read_csv(tmp_path / "a.csv")["eval_items"].tolist() == [200]
    (tmp_path / "results" / "dense").mkdir(parents=True)
    (tmp_path / "results" / "dense" / "summary.json").write_text(json.dumps(metrics(0.7, 40)))  # a smaller run
    with pytest.raises(FlowError, match="cover 80 evaluation items, the sweep rows 200") as e:
        report(tmp_path, csvs=[tmp_path / "a.csv"], out=tmp_path / "out")
    assert "--dense" in e.value.fix and not (tmp_path / "out").exists()
    (tmp_path / "dense100.json").write_text(json.dumps(metrics(0.6, 100)))
    md = report(tmp_path, csvs=[tmp_path / "a.csv"], out=tmp_path / "out", dense=tmp_path / "dense100.json")
    assert "| dense | 0.60 / 0.60 | 0.60 / 0.60 |" in md
    with pytest.raises(FlowError, match="no dense metrics at"):
        report(tmp_path, csvs=[tmp_path / "a.csv"], dense=tmp_path / "missing.json")


def test_cli_logs_user_errors_without_tracebacks():
    """A DietError logged with its exception (as Prefect logs a failed flow) keeps the message, not the
    traceback; any other exception keeps its traceback."""
    import logging

    from flows.cli import _quiet_user_error_tracebacks

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    factory = logging.getLogRecordFactory()
    logger = logging.getLogger("diet-test-cli")
    logger.addHandler(Keep())
    try:
        _quiet_user_error_tracebacks()
        for exc in (FlowError("no remote", "add one"), ValueError("a bug")):
            try:
                raise exc
            except Exception:
                logger.exception("flow failed")
    finally:
        logging.setLogRecordFactory(factory)
    user, bug = records
    assert user.exc_info is None and "flow failed" in user.getMessage()
    assert bug.exc_info is not None and bug.exc_info[0] is ValueError


def test_a_stage_that_refused_its_input_is_not_retried():
    """Prefect retries a failed DVC task unless the stage refused its input (its `error:` / `  fix:` lines):
    the same input fails the same way, so the error is printed once."""
    from types import SimpleNamespace

    from flows.repo import retry_unless_input_error

    refused = DvcCommandError(["repro", "-s", "select"], 1, "Running stage 'select':\n> python -m stages.select\n"
                              "error: select.multiple = 8 is not smaller than the attention group's width\n"
                              "  fix: set select.multiple: {mlp: 8, attention: 1}\nERROR: failed to reproduce 'select'")
    crashed = DvcCommandError(["repro", "-s", "score@t1"], 1, "Running stage 'score@t1':\nKilled\n"
                              "ERROR: failed to reproduce 'score@t1': exited with -9")
    assert retry_unless_input_error(None, None, SimpleNamespace(data=refused)) is False
    assert retry_unless_input_error(None, None, SimpleNamespace(data=crashed)) is True
    stopped = DvcCommandError(["repro", "-s", "select"], 255, "Running stage 'select':\ninterrupted: select; its "
                              "outputs are written whole or not at all\nERROR: failed to reproduce 'select'")
    assert retry_unless_input_error(None, None, SimpleNamespace(data=stopped)) is False  # Ctrl-C: stop, no retry
    assert retry_unless_input_error(None, None, SimpleNamespace(data=RuntimeError("worker lost"))) is True


def _processes_with(variable: str, value: str) -> list[int]:
    """The pids of the running processes whose environment holds ``variable=value`` (children inherit it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{variable}={value}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def _signal_when(args: list[str], env: dict[str, str], needle: str,
                 send) -> tuple[subprocess.Popen, list[str], int, float]:
    """Start ``diet-flow *args`` in a session of its own, ``send(proc)`` once a line of its output holds
    ``needle``, and wait for it to exit (SIGKILL after 30 s). Returns the process, its output lines, how many
    had come before the signal, and the seconds from the signal to the exit."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not any(needle in line for line in seen):
        assert proc.poll() is None and time.time() < deadline, "".join(seen)[-3000:]
        time.sleep(0.2)
    before, start = len(seen), time.time()
    send(proc)
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.time() - start
    reader.join(10)
    return proc, seen, before, took


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_ctrl_c_on_diet_flow_run_stops_everything_within_seconds_in_one_line(tmp_path):
    """SIGINT to the process group of `diet-flow run` (what Ctrl-C at a terminal does) while a stage runs: exit
    130 within 20 s (a few seconds on an idle machine; 12.5 s was seen with the test suite's two workers on 2
    cores; it took over 60 s before the flows' server got its own session), one line, no traceback, no process
    left (the flow's temporary Prefect server included), and a rerun resumes."""
    repo = make_tiny_repo(tmp_path)
    mark = f"diet-test-{os.getpid()}-{time.time_ns()}"
    env = dvc_env({"DIET_TEST_MARK": mark, "PYTHONPATH": str(PROJECT)})
    env.pop("PREFECT_API_URL", None)
    proc, seen, before, took = _signal_when(["run", "--repo", str(repo)], env, "Running stage 'model'",
                                            lambda p: os.killpg(p.pid, signal.SIGINT))
    after = [line for line in seen[before:] if line.strip()]
    assert proc.returncode == 130, "".join(seen)[-3000:]
    assert took < 20, f"{took:.1f} s"
    assert "Traceback" not in "".join(seen), "".join(seen)[-3000:]
    assert len(after) <= 3 and after[-1].startswith("interrupted: diet-flow run;"), after  # lines in flight + ours
    time.sleep(1)
    assert _processes_with("DIET_TEST_MARK", mark) == [], "a process of the interrupted run is still running"
    resumed = subprocess.run([dvc(), "repro", "model"], cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_ends_a_dask_run_within_seconds_and_its_flow_run_crashed(tmp_path):
    """SIGTERM to `diet-flow run --runner dask` (what a scheduler or `kill` sends) while a stage runs: the
    command exits within 15 s, its Dask workers stop, and the flow run ends in a terminal state on the server
    (here a temporary one that outlives the command)."""
    import httpx

    from flows.server import flow_server

    repo = make_tiny_repo(tmp_path)
    mark = f"diet-test-{os.getpid()}-{time.time_ns()}"
    with flow_server() as url:
        env = dvc_env({"DIET_TEST_MARK": mark, "PYTHONPATH": str(PROJECT), "PREFECT_API_URL": url})
        proc, seen, _, took = _signal_when(["run", "--repo", str(repo), "--runner", "dask"], env, "Running stage",
                                           lambda p: p.terminate())
        assert took < 15 and proc.returncode == 128 + signal.SIGTERM, (took, proc.returncode, "".join(seen)[-3000:])
        assert "".join(seen).rstrip().splitlines()[-1].startswith("interrupted: diet-flow run;")
        states = {r["name"]: r["state_type"] for r in
                  httpx.post(f"{url}/flow_runs/filter", json={}, timeout=10).json()}
        assert states and set(states.values()) <= {"CRASHED", "CANCELLED", "FAILED"}, states
    deadline = time.monotonic() + 10   # the workers get SIGTERM with the command and may take a moment to exit
    while _processes_with("DIET_TEST_MARK", mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with("DIET_TEST_MARK", mark) == [], "a worker of the terminated run is still running after 10 s"


def test_ctrl_c_on_a_flow_command_prints_one_line(monkeypatch, capsys, tmp_path):
    import flows.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.cli, "dispatch", interrupted)
    assert flows.cli.main(["run", "--repo", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: diet-flow run;") and "Rerun the same command" in err
