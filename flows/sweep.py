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

The parts live beside this flow: the points and their checks in ``flows.points``, running them as DVC experiments
and reading them back in ``flows.experiments``, the tables and their paired comparisons in ``flows.tables``, and
``diet-flow report`` in ``flows.sweep_report``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.experiments import _restore, _snapshot, check_mode, run_points
from flows.pipeline import make_task_runner, plan, publish_report, run_stages, validate_run
from flows.points import SWEPT, Point, check_points, make_points
from flows.repo import downstream, read_params, stages_reading, write_params
from flows.tables import write_results


@flow(name="diet-sweep")
def sweep_flow(repo: str = ".", sparsities: list[float] | None = None, methods: list[str] | None = None,
               params: dict[str, Any] | None = None, task_runner: str = "threads", workers: int = 2,
               address: str | None = None, retries: int = 1, mode: str = "queue", jobs: int | None = None,
               timeout: float | None = None, groups: list[str] | None = None,
               vary: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every (method, groups, sparsity) as a DVC experiment, reusing one computation of every task score.

    ``methods`` are merge methods, each optionally with the recovery its models use: ``vote``, ``vote+bias``.
    ``groups`` are combinations of dimension groups to prune (``prune.groups``), e.g. ``["mlp", "mlp+hidden"]``;
    None keeps params.yaml's. ``vary`` (``KEY=VALUE`` each) adds an ablation: per point, one more experiment with
    that one params change, compared with the point without it (``acc_vs_default``); the stages that read the key
    run in each experiment (``score.statistic`` reruns the score@ stages there). Every point's params are
    checked as the stages would check them, before anything runs.
    ``params`` overrides other settings for the whole sweep (restored afterwards with params.yaml).
    ``mode``: ``queue`` runs the experiments ``jobs`` (default: ``workers``) at a time in DVC's queue, each in a
    temporary copy of the repo (``timeout``: seconds to wait for them, None: no limit); ``workspace`` runs them
    one after the other in the workspace. Returns the table rows, the output paths, and which stages ran in the
    shared step and per experiment.
    """
    points = make_points(sparsities, methods, groups, vary)
    runs, root, shared = experiments_flow(repo, points, params, task_runner, workers, address, retries, mode, jobs,
                                          timeout, "diet-sweep")
    tasks = read_params(root).get("tasks") or []
    table, md, paths = write_results(root, runs, tasks)
    create_table_artifact(key="diet-sweep", table=table.to_dict("records"),
                          description=f"DIET sweep in {root}: one row per (method, sparsity)")
    create_markdown_artifact(key="diet-sweep-summary", markdown=md + "\n" + "\n".join(f"- `{p}`" for p in paths))
    create_link_artifact(key="diet-sweep-plot", link=paths[2].as_uri(), link_text="accuracy vs sparsity")
    get_run_logger().info("sweep table -> %s\n%s", paths[0], md)
    return {"rows": table.to_dict("records"), "files": [str(p) for p in paths], "shared": shared,
            "experiments": [{"method": r["point"].label, "sparsity": r["point"].sparsity,
                             "experiment": r["experiment"], "stages": r["stages"]} for r in runs]}


def experiments_flow(repo: str, points: list[Point], params: dict[str, Any] | None, task_runner: str, workers: int,
                     address: str | None, retries: int, mode: str, jobs: int | None, timeout: float | None,
                     artifact: str) -> tuple[list[dict[str, Any]], Path, dict[str, str]]:
    """What every sweep does: apply ``params``, run the stages no point changes once in the workspace, run the
    points as DVC experiments, and put params.yaml, dvc.lock and the workspace outputs back.
    Returns the runs, the repository root, and the shared stages' statuses (``ran`` / ``cached``)."""
    logger = get_run_logger()
    jobs = check_mode(mode, workers if jobs is None else jobs)
    runner = make_task_runner(task_runner, workers, address)
    root = validate_run(repo, params)
    geometry_checked = check_points(root, params, points)  # a point that would fail in the queue fails here
    snap = _snapshot(root)
    try:
        changed = write_params(root, params)
        if changed:
            logger.info("params.yaml for the sweep: set %s", ", ".join(changed))
        graph, order = plan(root)
        varied = {key for point in points for key, _ in point.setting}  # an ablation's stages run per experiment
        swept = downstream(graph, stages_reading(root, graph, (*SWEPT, *varied)))
        shared = [s for s in order if s not in swept]
        logger.info("shared stages, run once: %s; per experiment: %s", ", ".join(shared),
                    ", ".join(s for s in order if s in swept))
        rows = run_stages.with_options(task_runner=runner)(str(root), graph, shared, False, retries)
        publish_report(rows, f"{artifact}-shared", f"{artifact} in {root}: stages shared by every experiment")
        if not geometry_checked:  # the sweep's model is in the workspace now: its widths decide what fits
            check_points(root, None, points)
        sweep_id = time.strftime("%Y%m%dT%H%M%S")
        runs = run_points(root, points, order, sweep_id, mode, jobs, snap, retries, timeout)
    finally:
        _restore(root, snap)
    return runs, root, {r["stage"]: r["status"] for r in rows}

