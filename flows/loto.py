"""Leave-one-task-out: how a mask does on a task it was not calibrated for.

For every merge method that uses the tasks (``vote``, ``mean``, ``rank``) and every task ``t`` of params.yaml,
one DVC experiment merges the scores of the other tasks (``merge.weights.t = 0``: ``t`` has no vote, and no share in the recovery means) and evaluates the
pruned model on ``t`` alone (targets ``evaluate@t`` and ``evaluate_dense@t``: no other task is evaluated).
One more experiment per method merges every task and evaluates all of them: the in-calibration reference
(DVC restores it from the run-cache when a sweep already ran the same point).

The held-out row of a method gathers, per task, the model that never saw that task; its mean over tasks is
compared, with paired bootstrap intervals over the same items, to the dense model, to the same method
calibrated on every task, and to ``task_agnostic`` (else the first method). A method that never sees a task
(``task_agnostic``, ``wanda_sp``, ``flap``, ``magnitude``, ``random``) has one model, which is also its model
with any task held out: it runs no held-out experiment. Experiments run as in ``flows.sweep`` (queued by default:
the workspace, params.yaml, dvc.lock and HEAD are left alone). Writes ``results/loto.csv`` (one row per method,
task and calibration), ``results/loto-items.json`` and ``results/loto.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from diet import markdown
from diet.registry import MERGE_METHODS
from flows.repo import FlowError, atomic_write, merged_params, read_params
from flows.experiments import Items, read_items
from flows.points import Point, parse_variant
from flows.sweep import experiments_flow
from flows.tables import interval_cell
from flows.comparisons import paired_mean

CSV, MARKDOWN, ITEMS = "results/loto.csv", "results/loto.md", "results/loto-items.json"
#: the merge methods whose mask depends on the tasks (``MergeMethod.uses_tasks`` in the torch-free registry); every
#: other method (task_agnostic, wanda_sp, flap, magnitude, random) never sees a task, with or without recovery,
#: so its model with a task held out is its one model: no held-out experiment runs for it
TASK_METHODS = MERGE_METHODS.names(lambda f: f.uses_tasks)
DEFAULT_METHODS = ("vote", "task_agnostic")
ALL, HELD_OUT = "all tasks", "task held out"


def loto_points(methods: list[str], tasks: list[str], sparsity: float) -> list[Point]:
    """Per method: one point per held-out task, then the point calibrated on every task."""
    if len(tasks) < 2:
        raise FlowError(f"leave-one-task-out needs at least two tasks, params lists {len(tasks)}",
                        "add tasks to 'tasks' in params.yaml (or pass --set 'tasks=[a, b, c]')")
    points = []
    for method, recover in (parse_variant(m) for m in methods):
        held = [Point(method, sparsity, recover, held_out=t) for t in tasks] if method in TASK_METHODS else []
        points += held + [Point(method, sparsity, recover)]
    return points


def collect(runs: list[dict[str, Any]], tasks: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (method, calibration, task, acc, acc_norm, n, experiment) and per-item results
    ``{"dense": Items, "rows": {"<label>|<calibration>": Items}}`` of the runs of ``loto_points``."""
    rows, items, dense = [], {}, {}
    for run in runs:
        point, read = run["point"], run["read"]
        if point.held_out and point.method not in TASK_METHODS:
            continue  # a held-out run of a method that never sees a task: the same model as its run on all tasks
        calibration = HELD_OUT if point.held_out else ALL
        evaluated = [point.held_out] if point.held_out else tasks
        pruned = read_items(read, evaluated, "pruned")
        dense_run = read_items(read, evaluated, "dense")
        if pruned is None or dense_run is None:
            raise FlowError(f"experiment {run['experiment']} recorded no evaluation of {', '.join(evaluated)}",
                            "check dvc.yaml: evaluate@<task> and evaluate_dense@<task> must write "
                            "results/{pruned,dense}/tasks/<task>.json")
        # a method that never sees a task: its one model is also its model with any task held out
        calibrations = [calibration] if point.method in TASK_METHODS else [ALL, HELD_OUT]
        for calibration in calibrations:
            key = f"{point.label}|{calibration}"
            for task in evaluated:
                items.setdefault(key, {})[task] = pruned[task]
                dense.setdefault(task, dense_run[task])
                values = list(pruned[task].values())
                rows.append({"method": point.label, "calibration": calibration, "task": task,
                             "acc": sum(v[0] for v in values) / len(values),
                             "acc_norm": sum(v[1] for v in values) / len(values), "n": len(values),
                             "experiment": run["experiment"]})
    return rows, {"dense": dense, "rows": items}


def render(table, items: dict[str, Any], methods: list[str], sparsity: float) -> str:
    """Per-task acc / acc_norm and the mean, per method and calibration, with paired intervals."""
    from diet.evaluation.stats import DEFAULT_RESAMPLES as RESAMPLES
    tasks = sorted(table["task"].unique())
    dense: Items = items["dense"]
    reference = "task_agnostic" if "task_agnostic" in methods else methods[0]
    head = ["model", *tasks, "mean acc", "Δ acc vs dense", "Δ held out vs all tasks", f"Δ vs {reference} held out"]
    lines = [f"**Leave-one-task-out at sparsity {sparsity:g}**: each *task held out* cell comes from a model whose "
             "merge left that task out; cells are acc / acc_norm.", "",
             *markdown.head(head)]

    def mean_of(model: Items, metric: int) -> float:
        return sum(sum(v[metric] for v in by_id.values()) / len(by_id) for by_id in model.values()) / len(model)

    def cells(model: Items) -> list[str]:
        return [f"{mean_of({t: model[t]}, 0):.2f} / {mean_of({t: model[t]}, 1):.2f}" if t in model else ""
                for t in tasks]

    def diff(ref: Items | None, cand: Items) -> str:
        if ref is None or set(ref) != set(cand):
            return ""
        d = paired_mean(ref, cand)
        return interval_cell({"acc_x": d.diff, "acc_x_low": d.low, "acc_x_high": d.high}, "x")

    lines.append("| dense | " + " | ".join(cells(dense)) + f" | {mean_of(dense, 0):.4f} | | | |")
    ref_model = items["rows"].get(f"{reference}|{HELD_OUT}")
    for method in methods:
        task_free = method.partition("+")[0] not in TASK_METHODS
        for calibration in ((ALL,) if task_free else (ALL, HELD_OUT)):
            model = items["rows"].get(f"{method}|{calibration}")
            if model is None:
                continue
            other = items["rows"].get(f"{method}|{ALL}") if calibration == HELD_OUT else None
            vs_ref = diff(ref_model, model) if calibration == HELD_OUT and method != reference else ""
            name = f"{method} (no task used)" if task_free else f"{method} ({calibration})"
            lines.append(markdown.row([name, *cells(model), f"{mean_of(model, 0):.4f}", diff(dense, model),
                                       diff(other, model), vs_ref]))
    lines += ["", "Δ: difference in mean acc over tasks on the same items, with the 95% interval of a paired "
              f"bootstrap over items ({RESAMPLES:,} resamples, seed 0); * marks an interval that excludes zero. A method "
              "marked *no task used* never sees the tasks: its one model is also its model with any task held "
              "out.", ""]
    return "\n".join(lines)


@flow(name="diet-loto")
def loto_flow(repo: str = ".", methods: list[str] | None = None, params: dict[str, Any] | None = None,
              task_runner: str = "threads", workers: int = 2, address: str | None = None, retries: int = 1,
              mode: str = "queue", jobs: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Leave-one-task-out for each of ``methods`` (``vote``, ``task_agnostic``, ``vote+bias``...) at params'
    sparsity (after ``params`` overrides); returns the table rows and the output paths."""
    methods = [str(m) for m in (methods if methods is not None else DEFAULT_METHODS)]
    if not methods or len(set(methods)) != len(methods):
        raise FlowError("leave-one-task-out needs distinct methods", "pass e.g. methods=['vote', 'task_agnostic']")
    merged = merged_params(read_params(Path(repo)), params)
    tasks, sparsity = list(merged.get("tasks") or []), float(merged["prune"]["sparsity"])
    points = loto_points(methods, tasks, sparsity)
    runs, root, _ = experiments_flow(repo, points, params, task_runner, workers, address, retries, mode, jobs, timeout,
                                     "diet-loto")
    out = write_loto(root, runs, tasks, methods, sparsity)
    md = (root / MARKDOWN).read_text()
    create_markdown_artifact(key="diet-loto", markdown=md)
    get_run_logger().info("leave-one-task-out -> %s\n%s", root / MARKDOWN, md)
    return out


def loto_report(repo: str | Path, experiments: list[str], methods: list[str] | None = None) -> dict[str, Any]:
    """The leave-one-task-out table again, from finished experiments (shell-style name patterns, e.g. those of a
    ``loto`` run whose flow was stopped): no experiment runs. ``methods`` fixes the row order (default: as
    found)."""
    from flows.experiments import finished_runs

    root = Path(repo)
    runs = finished_runs(root, experiments)
    found = list(dict.fromkeys(r["point"].label for r in runs))
    methods = list(methods) if methods else found
    sparsities = {r["point"].sparsity for r in runs}
    if len(sparsities) != 1:
        raise FlowError(f"the experiments span sparsities {sorted(sparsities)}", "pick those of one loto run")
    tasks = sorted({r["point"].held_out for r in runs if r["point"].held_out})
    return write_loto(root, runs, tasks, methods, sparsities.pop())


def write_loto(root: Path, runs: list[dict[str, Any]], tasks: list[str], methods: list[str],
               sparsity: float) -> dict[str, Any]:
    """``results/loto.csv``, ``results/loto-items.json`` and ``results/loto.md`` from the runs of ``loto_points``."""
    import pandas as pd

    rows, items = collect(runs, tasks)
    table = pd.DataFrame(rows)
    md = render(table, items, [Point(m, sparsity, r).label for m, r in map(parse_variant, methods)], sparsity)
    atomic_write(root / CSV, table.to_csv(index=False))
    atomic_write(root / ITEMS, json.dumps(items, sort_keys=True, separators=(",", ":")) + "\n")
    atomic_write(root / MARKDOWN, md)
    return {"rows": rows, "files": [str(root / p) for p in (CSV, MARKDOWN, ITEMS)],
            "runs": [{"method": r["point"].label, "held_out": r["point"].held_out, "experiment": r["experiment"],
                      "stages": r["stages"]} for r in runs]}
