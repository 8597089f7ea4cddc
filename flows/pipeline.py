"""The DIET pipeline as a Prefect flow that drives DVC.

DVC owns the stage graph and the cache; this flow runs each stage with ``dvc repro -s <stage>`` as its own
Prefect task, submitted once, after the tasks of its upstream stages. Independent stages (every
``prepare@task``, every ``score@task``) therefore run side by side on the chosen task runner, and no two
DVC commands ever touch the same stage at once. Each task logs DVC's output; the flow returns, logs and
publishes which stages ran and which DVC found cached.

    pipeline_flow(repo=".", params={"prune": {"sparsity": 0.3}}, task_runner="dask", workers=2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.repo import (CACHED, RAN, DvcCommandError, FlowError, check_stages, check_tasks, ensure_repo,
                       merged_params, read_params, retry_unless_input_error, run_dvc, stage_graph, stage_status,
                       topological, upstream, write_params)

TASK_RUNNERS = ("threads", "dask", "ray")


def make_task_runner(kind: str = "threads", workers: int = 2, address: str | None = None):
    """A Prefect task runner: ``threads`` (this process), ``dask`` (a LocalCluster of ``workers`` processes,
    or the scheduler at ``address``), ``ray`` (a local Ray, or the cluster at ``address``)."""
    if not isinstance(workers, int) or workers < 1:
        raise FlowError(f"workers = {workers!r} must be a positive integer", "pass e.g. workers=2")
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise FlowError("task_runner='dask' needs prefect-dask", "pip install -e '.[dask]'") from None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise FlowError("task_runner='ray' needs prefect-ray", "pip install -e '.[ray]'") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner(init_kwargs={"num_cpus": workers})
    raise FlowError(f"unknown task_runner {kind!r}", f"use one of: {', '.join(TASK_RUNNERS)}")


@task(name="dvc-repro", task_run_name="{stage}", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_input_error)
def repro_stage(repo: str, stage: str, pull: bool = False) -> dict[str, Any]:
    """``dvc repro -s <stage>``: run one stage, or let DVC skip it when its inputs are unchanged.

    Returns ``{"stage", "status": "ran" | "cached", "seconds"}``; a failure raises with DVC's output.
    """
    logger = get_run_logger()
    args = ["repro", "--single-item", stage] + (["--pull"] if pull else [])
    res = run_dvc(args, repo, check=False)
    if res.output.strip():
        logger.info("dvc %s\n%s", " ".join(args), res.output.rstrip())
    if res.returncode != 0:
        raise DvcCommandError(args, res.returncode, res.output)
    return {"stage": stage, "status": stage_status(res, [stage])[stage], "seconds": round(res.seconds, 2)}


@flow(name="diet-stages")
def run_stages(repo: str, graph: dict[str, list[str]], stages: list[str], pull: bool = False,
               retries: int = 1) -> list[dict[str, Any]]:
    """Submit every stage once, after its upstream stages; results in ``stages`` order."""
    repro = repro_stage.with_options(retries=retries)
    futures: dict[str, Any] = {}
    for stage in stages:  # topological: each stage's upstream futures already exist
        wait = [futures[p] for p in graph[stage] if p in futures]
        futures[stage] = repro.submit(repo, stage, pull, wait_for=wait)
    return [futures[s].result() for s in stages]  # the first failure (in graph order) raises


def plan(repo: Path, targets: list[str] | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """The stage graph and the stages to run, in order: all of them, or ``targets`` and their upstream."""
    graph = stage_graph(repo)
    order = topological(graph)
    if targets:
        check_stages(graph, targets)
        keep = upstream(graph, targets)
        order = [s for s in order if s in keep]
    return graph, order


def format_report(rows: list[dict[str, Any]]) -> str:
    width = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  status  seconds"]
    lines += [f"{r['stage']:<{width}}  {r['status']:<6}  {r['seconds']:>7.1f}" for r in rows]
    return "\n".join(lines)


def publish_report(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """Log the stage table and publish it as a Prefect table artifact."""
    get_run_logger().info("%s\n%s", description, format_report(rows))
    create_table_artifact(key=key, table=rows, description=description)


def validate_run(repo: str | Path, params: dict[str, Any] | None) -> Path:
    """Fail fast, before anything runs or changes: ``repo`` must be a DVC project, every overridden params key
    must exist, the params with the overrides applied must validate as the stages will read them (values,
    types, cross-key rules: ``diet.config.Params``), and every task must have a task file. Returns the
    repository root."""
    from diet.config import Params
    from diet.errors import ConfigError

    root = ensure_repo(repo)
    merged = merged_params(read_params(root), params)
    tasks = merged.get("tasks")
    if isinstance(tasks, list) and tasks:  # a task without its file first; any other list is Params' to refuse
        check_tasks(root, tasks)
    try:
        Params.from_dict(merged)
    except ConfigError as e:
        where = "params.yaml with --set applied" if params else "params.yaml"
        raise FlowError(f"{where}: {e.problem}", (e.fix or "") + (" (in --set KEY=VALUE)" if params else ""),
                        artifact=e.artifact) from None
    return root


def nothing_to_do(repo: str | Path, params: dict[str, Any] | None, targets: list[str] | None = None
                  ) -> dict[str, str] | None:
    """``{stage: "cached"}`` when a run would do nothing: ``params`` leaves params.yaml as it is and ``dvc
    status`` finds every stage (``targets`` and their upstream ones) up to date, outputs in place; else None.
    The command then answers in about the time of `dvc status`, without a flow or a Prefect server."""
    root = ensure_repo(repo)
    current = read_params(root)
    if merged_params(current, params) != current:
        return None
    _, stages = plan(root, targets)
    status = run_dvc(["status", "--json", *(["--with-deps", *targets] if targets else [])], root, check=False)
    if status.returncode != 0 or status.output.strip() != "{}":
        return None
    return {s: CACHED for s in stages}


@flow(name="diet-pipeline")
def pipeline_flow(repo: str = ".", params: dict[str, Any] | None = None, task_runner: str = "threads",
                  workers: int = 2, address: str | None = None, targets: list[str] | None = None,
                  pull: bool = False, retries: int = 1, shared_disk: bool = True, git_url: str | None = None,
                  workdir: str | None = None) -> dict[str, str]:
    """Run the DIET pipeline in ``repo`` and return ``{stage: "ran" | "cached"}``.

    ``params`` overrides params.yaml before the run and stays written there, so the workspace records what
    ran (nested ``{"prune": {"sparsity": 0.3}}`` or dotted ``{"prune.sparsity": 0.3}``). ``targets`` limits
    the run to those stages and their upstream ones. ``pull`` lets DVC fetch missing outputs and run-cache
    hits from the default remote (``dvc repro --pull``). ``retries`` applies to each stage.

    ``shared_disk=False``: the workers share no folder with this one. Each runs its stages in its own clone of
    ``git_url`` (default: this repository's path) under ``workdir`` (default: its temporary folder), at this
    commit with this params.yaml and dvc.lock, and exchanges data through the default DVC remote; this
    workspace then pulls every output and records it in dvc.lock (see flows/remote_workers.py).
    """
    logger = get_run_logger()
    runner = make_task_runner(task_runner, workers, address)
    root = validate_run(repo, params)
    if not shared_disk:
        from flows.remote_workers import check_workspace

        checked = check_workspace(root, git_url)  # before params.yaml changes
    elif git_url or workdir:
        raise FlowError("git_url and workdir apply to workers without a shared disk",
                        "pass shared_disk=False (diet-flow run --no-shared-disk), or drop them")
    changed = write_params(root, params)
    if changed:
        logger.info("params.yaml: set %s", ", ".join(changed))
    graph, stages = plan(root, targets)
    where = "" if shared_disk else ", each worker in its own clone"
    logger.info("%d stages on %s x%d%s: %s", len(stages), task_runner, workers, where, ", ".join(stages))
    if shared_disk:
        rows = run_stages.with_options(task_runner=runner)(str(root), graph, stages, pull, retries)
    else:
        from flows.remote_workers import prepare, push_local_outputs, run_stages_in_clones

        spec = prepare(root, stages, workdir=workdir, checked=checked)
        push_local_outputs(root, stages)
        rows = run_stages_in_clones.with_options(task_runner=runner)(str(root), spec, graph, stages, retries)
    ran = sum(r["status"] == RAN for r in rows)
    publish_report(rows, "diet-pipeline-report",
                   f"DIET pipeline in {root}: {ran} stage(s) ran, {len(rows) - ran} cached")
    return {r["stage"]: r["status"] for r in rows}
