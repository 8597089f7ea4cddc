"""Sparsity x merge-method sweep: one DVC experiment per point, every task score computed once.

1. The stages that read no swept parameter (model, prepare@*, score@*, score_generic, evaluate_dense@*,
   perplexity_dense) run once in the workspace through the pipeline flow; their outputs land in DVC's cache
   and run-cache.
2. Each (method, sparsity) is a DVC experiment with ``-S prune.sparsity=.. -S merge.method=..``; DVC skips
   every stage whose inputs are unchanged, so only merge, select, prune, the pruned model's evaluate@*,
   perplexity and report run per point.
   ``mode="queue"`` (default): every point is queued (``dvc exp run --queue``), params.yaml and dvc.lock are
   put back at once, and ``dvc queue start --jobs N`` runs the points N at a time, each in its own temporary
   copy of the repo sharing the DVC cache: the workspace, params.yaml, dvc.lock and HEAD stay as they are
   while they run. The flow waits on the experiments' states in ``dvc exp show --json`` and reads each one's
   ``results/{pruned,dense}/summary.json`` at its experiment commit through ``dvc.api.read``.
   ``mode="workspace"``: ``dvc exp run`` in the workspace, one point after the other, each point's metrics
   read from the workspace right after it.
3. The rows go to ``results/sweep.csv``, ``results/sweep.md`` and ``plots/accuracy_vs_sparsity.png``, and
   are published as Prefect artifacts.
4. params.yaml and dvc.lock are put back as they were, and the workspace outputs checked out to match.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import repo as flows_repo  # dvc_executable looked up on use, never bound at import
from flows.pipeline import make_task_runner, plan, publish_report, run_stages, validate_run
from flows.repo import (RAN, RUN_LOG, DvcCommandError, DvcResult, FlowError, atomic_write, child_env, downstream,
                        read_run_log, run_dvc, stage_status, stages_reading, write_params)

SWEPT = ("prune.sparsity", "merge.method")
DEFAULT_SPARSITIES, DEFAULT_METHODS = (0.1, 0.2, 0.3), ("vote",)
PRUNED_METRICS = "results/pruned/summary.json"  # the report stage's whole record of each model
DENSE_METRICS = "results/dense/summary.json"
CSV, MARKDOWN, PLOT = "results/sweep.csv", "results/sweep.md", "plots/accuracy_vs_sparsity.png"
SWEEP_DENSE = "results/sweep-dense.json"  # the dense metrics of the sweep's own evaluation settings
MODES = ("queue", "workspace")
#: ``dvc exp show --json`` executor states of an experiment that has finished
DONE, FAILED = "success", "failed"


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def metrics_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The sweep columns of one evaluation's metrics: mean and per-task accuracy, size, perplexity."""
    mean = metrics.get("mean") or {}
    params = metrics.get("params") or {}
    row: dict[str, Any] = {
        "achieved_sparsity": _number(metrics.get("sparsity")),
        "acc": _number(mean.get("acc")),
        "acc_norm": _number(mean.get("acc_norm")),
        "perplexity": _number(metrics.get("perplexity")),
    }
    for name, value in params.items():
        if _number(value) is not None:
            row[f"params_{name}"] = int(value)
    tasks = metrics.get("tasks") or {}
    if tasks and all(isinstance(t.get("n"), int) for t in tasks.values()):
        row["eval_items"] = sum(t["n"] for t in tasks.values())
    for name, t in sorted(tasks.items()):
        row[f"acc_{name}"] = _number(t.get("acc"))
        row[f"acc_norm_{name}"] = _number(t.get("acc_norm"))
    return row


def _check_same_items(table, dense: dict[str, Any], dense_path: Path) -> None:
    """Refuse a dense reference evaluated on another number of items than the sweep's rows."""
    if "eval_items" not in table.columns or table["eval_items"].isna().all():
        return                                  # tables written before eval_items was recorded
    dense_items = metrics_row(dense).get("eval_items")
    sweep_items = sorted({int(n) for n in table["eval_items"].dropna()})
    if dense_items is not None and sweep_items != [dense_items]:
        raise FlowError(f"the dense metrics in {dense_path} cover {dense_items} evaluation items, the sweep rows "
                        f"{', '.join(map(str, sweep_items))}: the comparison would mix evaluation sizes",
                        "pass --dense with the dense metrics of the sweep's evaluate.limit, or rerun the sweep")


@task(name="dvc-exp-run", task_run_name="{method} @ {sparsity}", retries=1, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def run_experiment(repo: str, method: str, sparsity: float, stages: list[str], sweep_id: str,
                   metrics_file: str = PRUNED_METRICS) -> dict[str, Any]:
    """One workspace experiment; returns its name, which of ``stages`` ran, and its metrics (and the dense ones)."""
    logger = get_run_logger()
    name = experiment_name(method, sparsity, sweep_id)
    args = ["exp", "run", "--name", name, *_sets(method, sparsity)]
    res = run_dvc(args, repo, check=False)
    logger.info("dvc %s\n%s", " ".join(args), res.output.rstrip())
    if res.returncode != 0:
        raise DvcCommandError(args, res.returncode, res.output)
    path = Path(repo) / metrics_file
    if not path.is_file():
        raise FlowError(f"the experiment wrote no {metrics_file}",
                        "check dvc.yaml: the evaluate stage must declare it under metrics")
    dense = Path(repo) / DENSE_METRICS
    return {"method": method, "sparsity": sparsity, "experiment": name, "stages": stage_status(res, stages),
            "seconds": round(res.seconds, 2), "metrics": json.loads(path.read_text()),
            "dense": json.loads(dense.read_text()) if dense.is_file() else None}


def check_mode(mode: str, jobs: Any) -> int:
    """``jobs`` if ``mode`` is a sweep mode and ``jobs`` a worker count, else a FlowError naming the fix."""
    if mode not in MODES:
        raise FlowError(f"sweep mode {mode!r} is unknown", f"use one of: {', '.join(MODES)}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise FlowError(f"jobs = {jobs!r}: the queue needs at least one worker", "pass jobs=2 (or more)")
    return jobs


def _sets(method: str, sparsity: float) -> list[str]:
    return ["-S", f"prune.sparsity={sparsity}", "-S", f"merge.method={method}"]


def experiment_states(root: Path) -> dict[str, dict[str, Any]]:
    """``{experiment name: {"state": executor state or None, "rev": its commit}}`` from ``dvc exp show --json``
    (states: queued, running, success, failed; a finished experiment's commit holds its outputs' hashes)."""
    res = run_dvc(["exp", "show", "--json"], root)
    starts = [i for i, line in enumerate(res.output.splitlines(keepends=True)) if line.startswith("[")]
    try:  # the JSON list starts a line of its own; stderr lines (warnings) may come before it
        text = "".join(res.output.splitlines(keepends=True)[starts[0]:])
        baselines, _ = json.JSONDecoder().raw_decode(text)
    except (IndexError, ValueError):
        raise FlowError("`dvc exp show --json` printed no JSON list", "run it in the repo to see why") from None
    out: dict[str, dict[str, Any]] = {}
    for baseline in baselines:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            name = exp.get("name") or revs[0].get("name")
            if name:
                out[name] = {"state": (exp.get("executor") or {}).get("state"), "rev": revs[0].get("rev")}
    return out


def read_at(root: Path, path: str, rev: str) -> dict[str, Any] | None:
    """The JSON file ``path`` as experiment commit ``rev`` recorded it (from the DVC cache), None if absent."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return json.loads(dvc.api.read(path, repo=str(root), rev=rev))
    except (FileNotFoundError, DvcException):
        return None


def queue_experiments(root: Path, points: list[tuple[str, float]], sweep_id: str) -> list[str]:
    """Queue one experiment per (method, sparsity) with the workspace as it is now; returns their names."""
    names = []
    for method, sparsity in points:
        name = experiment_name(method, sparsity, sweep_id)
        run_dvc(["exp", "run", "--queue", "--name", name, *_sets(method, sparsity)], root)
        names.append(name)
    return names


def succeeded(root: Path, names: list[str]) -> set[str]:
    """Those of ``names`` whose experiment has a git ref (``refs/exps/.../<name>``): DVC writes it when the
    experiment succeeds. A cheap check (``git for-each-ref``) to poll often; ``experiment_states`` costs a DVC
    process and finds failures too."""
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return set(names) & {ref.rsplit("/", 1)[-1] for ref in out.splitlines()}


def run_queue(root: Path, names: list[str], jobs: int, run_log: Path, *, poll: float = 2.0,
              check_every: float = 30.0, timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Start DVC's queue with ``jobs`` workers and wait until every experiment of ``names`` has finished.

    ``dvc queue start`` leaves its workers running in the background; their stages append to ``run_log``.
    Polls ``succeeded`` every ``poll`` seconds and ``experiment_states`` (which sees failures) every
    ``check_every``. Returns each experiment's state and commit (``experiment_states``); a failed one is a
    FlowError naming the command that shows its log.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:  # not a pipe: the workers keep their copy of it open
        proc = subprocess.run([flows_repo.dvc_executable(), "queue", "start", "--jobs", str(jobs)], cwd=root,
                              env=child_env({RUN_LOG: str(run_log)}), stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            out.seek(0)
            raise DvcCommandError(["queue", "start", "--jobs", str(jobs)], proc.returncode, out.read().decode())
    checked = time.monotonic()
    while True:
        time.sleep(poll)
        pending = [n for n in names if n not in succeeded(root, names)]
        if pending and time.monotonic() - checked >= check_every:
            states, checked = experiment_states(root), time.monotonic()
            pending = [n for n in names if (states.get(n) or {}).get("state") not in (DONE, FAILED)]
        if not pending:
            break
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlowError(f"experiments {', '.join(pending)} had not finished after {timeout:.0f} s",
                            "see `dvc queue status`; stop them with `dvc queue kill NAME`, or raise the timeout")
    states = experiment_states(root)
    failed = [n for n in names if (states.get(n) or {}).get("state") != DONE]
    if failed:
        raise FlowError(f"experiment(s) {', '.join(failed)} failed in DVC's queue "
                        f"(states: {', '.join(str((states.get(n) or {}).get('state')) for n in failed)})",
                        f"read why with `dvc queue logs {failed[0]}`; drop them with `dvc queue remove --failed`")
    return states


def queued_runs(root: Path, points: list[tuple[str, float]], stages: list[str], sweep_id: str, jobs: int,
                snap: dict[str, bytes | None], timeout: float | None = None) -> list[dict[str, Any]]:
    """Every point as a queued experiment, ``jobs`` at a time: the rows ``write_results`` takes."""
    logger = get_run_logger()
    names = queue_experiments(root, points, sweep_id)
    _restore(root, snap)  # the queue holds each point's params.yaml and dvc.lock: the workspace goes back now
    logger.info("queued %s; running %d at a time", ", ".join(names), jobs)
    fd, log = tempfile.mkstemp(prefix="diet-queue-runs-", suffix=".jsonl")
    os.close(fd)
    start = time.monotonic()
    try:
        states = run_queue(root, names, jobs, Path(log), timeout=timeout)
        seconds = round(time.monotonic() - start, 2)
        runs = []
        for (method, sparsity), name in zip(points, names):
            rev = states[name]["rev"]
            metrics = read_at(root, PRUNED_METRICS, rev)
            if metrics is None:
                raise FlowError(f"experiment {name} ({rev}) recorded no {PRUNED_METRICS}",
                                "check dvc.yaml: the report stage must write it as an output")
            ran = DvcResult([], 0, "", seconds, tuple(read_run_log(log, name)))
            runs.append({"method": method, "sparsity": sparsity, "experiment": name, "rev": rev,
                         "stages": stage_status(ran, stages), "seconds": None, "queue_seconds": seconds,
                         "metrics": metrics, "dense": read_at(root, DENSE_METRICS, rev)})
            logger.info("%s @ %s (%s): ran %s", method, sparsity, name,
                        ", ".join(s for s, st in runs[-1]["stages"].items() if st == RAN) or "nothing")
        return runs
    finally:
        os.unlink(log)


def experiment_name(method: str, sparsity: float, sweep_id: str) -> str:
    """The DVC experiment name of one sweep point, e.g. ``vote-s0.2-20261129T0312`` (unique per sweep)."""
    return f"{method}-s{sparsity:g}-{sweep_id}"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def accuracy_table(table, dense: dict[str, Any] | None):
    """Mean accuracy with one column per method and a row per sparsity (the dense model as sparsity 0 when
    known): the data of ``accuracy_vs_sparsity.csv``, which ``dvc plots show`` draws as one line per method."""
    wide = table.pivot_table(index="sparsity", columns="method", values="acc", sort=False)
    wide = wide[list(dict.fromkeys(table["method"]))].sort_index()
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None and 0.0 not in wide.index:
        wide.loc[0.0] = dense_acc
        wide = wide.sort_index()
    wide.columns.name = None
    return wide.reset_index()


def plot_accuracy(table, path: Path, dense: dict[str, Any] | None) -> None:
    """Mean accuracy against requested sparsity, one line per method; the dense model as a reference.
    Writes the plot's data beside it (same name, ``.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in table.groupby("method", sort=False):
        g = g.sort_values("sparsity")
        ax.plot(g["sparsity"], g["acc"], marker="o", label=f"{method} acc")
        if g["acc_norm"].notna().any():
            ax.plot(g["sparsity"], g["acc_norm"], marker="x", linestyle="--", label=f"{method} acc_norm")
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle=":", label="dense acc")
    ax.set_xlabel("sparsity (share of decoder parameters removed)")
    ax.set_ylabel("mean zero-shot accuracy")
    ax.set_title("DIET: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    atomic_write(path.with_suffix(".csv"), accuracy_table(table, dense).to_csv(index=False))


def comparison_markdown(table, dense: dict[str, Any] | None) -> str:
    """One table per sparsity: a row per method (the dense model first), "acc / acc_norm" per task, the means
    and perplexity. ``table`` is the sweep table (results/sweep.csv)."""
    tasks = sorted(c[len("acc_"):] for c in table.columns
                   if c.startswith("acc_") and not c.startswith("acc_norm") and c != "acc_norm")
    head = ["method", *tasks, "mean acc", "mean acc_norm", "perplexity"]

    def pair(a: Any, b: Any) -> str:
        ok = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))  # noqa: E731
        return f"{a:.2f} / {b:.2f}" if ok(a) and ok(b) else (f"{a:.2f}" if ok(a) else "")

    def line(name: str, r: dict[str, Any]) -> str:
        cells = [name, *(pair(r.get(f"acc_{t}"), r.get(f"acc_norm_{t}")) for t in tasks),
                 *(f"{r[k]:.4f}" if isinstance(r.get(k), float) and not math.isnan(r[k]) else ""
                   for k in ("acc", "acc_norm")),
                 f"{r['perplexity']:.2f}" if isinstance(r.get("perplexity"), float) else ""]
        return "| " + " | ".join(cells) + " |"

    out = []
    dense_row = metrics_row(dense) if dense else None
    for sparsity, group in table.groupby("sparsity", sort=True):
        out += [f"**Sparsity {sparsity:g}** (share of decoder-layer parameters removed); cells are acc / acc_norm",
                "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        if dense_row:
            out.append(line("dense", dense_row))
        out += [line(str(r["method"]), r) for r in group.to_dict("records")]
        out.append("")
    return "\n".join(out)


def render(table, dense: dict[str, Any] | None) -> str:
    """The sweep's markdown: the summary table, the dense model's figures, and the per-task tables."""
    columns = [c for c in table.columns if not c.startswith("acc_norm_")]
    md = "# DIET sweep\n\n" + markdown_table(table.to_dict("records"), columns)
    if dense:
        md += "\nDense model: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics_row(dense).items()
                                             if k in ("acc", "acc_norm", "perplexity") and v is not None) + "\n"
    return md + "\n## Per task\n\n" + comparison_markdown(table, dense)


def write_results(root: Path, runs: list[dict[str, Any]], dense: dict[str, Any] | None):
    """The sweep table as CSV, markdown and plot under ``root``; returns the table and the three paths."""
    import pandas as pd

    rows = [{"method": r["method"], "sparsity": r["sparsity"], **metrics_row(r["metrics"]),
             "experiment": r["experiment"]} for r in runs]
    table = pd.DataFrame(rows)
    atomic_write(root / CSV, table.to_csv(index=False))
    if dense is not None:
        atomic_write(root / SWEEP_DENSE, json.dumps(dense, indent=2, sort_keys=True) + "\n")
    md = render(table, dense)
    atomic_write(root / MARKDOWN, md)
    plot_accuracy(table, root / PLOT, dense)
    return table, md, [root / CSV, root / MARKDOWN, root / PLOT]


def report(repo: str | Path = ".", csvs: list[str | Path] | None = None, out: str | Path | None = None,
           dense: str | Path | None = None) -> str:
    """Render the sweep markdown and plot again from sweep tables; return the markdown.

    By default from ``results/sweep.csv`` into ``results/sweep.md`` and ``plots/accuracy_vs_sparsity.png``.
    ``csvs`` combines several sweeps' tables (e.g. one per sparsity run on different days) and ``out`` names a
    folder for ``sweep.csv``, ``sweep.md`` and ``accuracy_vs_sparsity.png``. The dense reference row comes from
    ``dense`` (default: ``results/sweep-dense.json``, which a sweep writes, else ``results/dense/summary.json``); it must
    cover as many evaluation items as the rows.
    """
    import pandas as pd

    root = Path(repo)
    paths = [Path(c) for c in csvs] if csvs else [root / CSV]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FlowError(f"no sweep table at {', '.join(missing)}", "run `diet-flow sweep` first")
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    table = table.drop_duplicates(["method", "sparsity"], keep="last").sort_values("sparsity", kind="stable")
    if dense is not None:
        dense_path = Path(dense)
    else:  # the dense metrics the sweep itself used, else the workspace's
        dense_path = root / SWEEP_DENSE if (root / SWEEP_DENSE).is_file() else root / DENSE_METRICS
    if dense is not None and not dense_path.is_file():
        raise FlowError(f"no dense metrics at {dense_path}", "pass the results/dense/summary.json of a pipeline run (the report stage writes it)")
    dense = json.loads(dense_path.read_text()) if dense_path.is_file() else None
    if dense is not None:
        _check_same_items(table, dense, dense_path)
    md = render(table, dense)
    if out is None:
        md_path, plot_path = root / MARKDOWN, root / PLOT
    else:
        out = Path(out)
        md_path, plot_path = out / "sweep.md", out / "accuracy_vs_sparsity.png"
        atomic_write(out / "sweep.csv", table.to_csv(index=False))
    atomic_write(md_path, md)
    plot_accuracy(table, plot_path, dense)
    return md


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {name: (root / name).read_bytes() if (root / name).is_file() else None
            for name in ("params.yaml", "dvc.lock")}


def _restore(root: Path, snap: dict[str, bytes | None]) -> None:
    for name, data in snap.items():
        if data is None:
            (root / name).unlink(missing_ok=True)
        else:
            atomic_write(root / name, data)
    res = run_dvc(["checkout"], root, check=False)  # workspace outputs back in line with dvc.lock
    if res.returncode != 0:
        get_run_logger().warning("dvc checkout after the sweep:\n%s", res.output.rstrip())


@flow(name="diet-sweep")
def sweep_flow(repo: str = ".", sparsities: list[float] | None = None, methods: list[str] | None = None,
               params: dict[str, Any] | None = None, task_runner: str = "threads", workers: int = 2,
               address: str | None = None, retries: int = 1, mode: str = "queue", jobs: int | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Evaluate every (method, sparsity) as a DVC experiment, reusing one computation of every task score.

    ``params`` overrides other settings for the whole sweep (restored afterwards with params.yaml).
    ``mode``: ``queue`` runs the experiments ``jobs`` (default: ``workers``) at a time in DVC's queue, each in a
    temporary copy of the repo (``timeout``: seconds to wait for them, None: no limit); ``workspace`` runs them
    one after the other in the workspace. Returns the table rows, the output paths, and which stages ran in the
    shared step and per experiment.
    """
    logger = get_run_logger()
    sparsities = [float(s) for s in (sparsities if sparsities is not None else DEFAULT_SPARSITIES)]
    methods = [str(m) for m in (methods if methods is not None else DEFAULT_METHODS)]
    if not sparsities or not methods:
        raise FlowError("the sweep needs at least one sparsity and one method", "pass e.g. sparsities=[0.1, 0.2]")
    if len(set(sparsities)) != len(sparsities) or len(set(methods)) != len(methods):
        raise FlowError("sparsities and methods must not repeat", "list each value once")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad:
        raise FlowError(f"sparsities {bad} are outside (0, 1)", "pass shares of parameters to remove, e.g. 0.2")
    jobs = check_mode(mode, workers if jobs is None else jobs)
    runner = make_task_runner(task_runner, workers, address)
    root = validate_run(repo, params)
    snap = _snapshot(root)
    runs: list[dict[str, Any]] = []
    try:
        changed = write_params(root, params)
        if changed:
            logger.info("params.yaml for the sweep: set %s", ", ".join(changed))
        graph, order = plan(root)
        swept = downstream(graph, stages_reading(root, graph, SWEPT))
        shared = [s for s in order if s not in swept]
        logger.info("shared stages, run once: %s; per experiment: %s", ", ".join(shared),
                    ", ".join(s for s in order if s in swept))
        rows = run_stages.with_options(task_runner=runner)(str(root), graph, shared, False, retries)
        publish_report(rows, "diet-sweep-shared", f"DIET sweep in {root}: stages shared by every experiment")
        sweep_id = time.strftime("%Y%m%dT%H%M%S")
        points = [(method, sparsity) for method in methods for sparsity in sparsities]
        if mode == "queue":
            runs = queued_runs(root, points, order, sweep_id, jobs, snap, timeout)
        else:
            experiment = run_experiment.with_options(retries=retries)
            for method, sparsity in points:
                run = experiment(str(root), method, sparsity, order, sweep_id)
                ran = [s for s, st in run["stages"].items() if st == RAN]
                logger.info("%s @ %s (%s): ran %s", method, sparsity, run["experiment"], ", ".join(ran) or "nothing")
                runs.append(run)
        dense = next((r["dense"] for r in runs if r["dense"]), None)
    finally:
        _restore(root, snap)

    table, md, paths = write_results(root, runs, dense)
    create_table_artifact(key="diet-sweep", table=table.to_dict("records"),
                          description=f"DIET sweep in {root}: one row per (method, sparsity)")
    create_markdown_artifact(key="diet-sweep-summary", markdown=md + "\n" + "\n".join(f"- `{p}`" for p in paths))
    create_link_artifact(key="diet-sweep-plot", link=paths[2].as_uri(), link_text="accuracy vs sparsity")
    logger.info("sweep table -> %s\n%s", paths[0], md)
    return {"rows": table.to_dict("records"), "files": [str(p) for p in paths],
            "shared": {r["stage"]: r["status"] for r in rows},
            "experiments": [{k: r[k] for k in ("method", "sparsity", "experiment", "stages")} for r in runs]}
