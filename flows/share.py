"""Share task scores between teams through a DVC remote.

A score is keyed by what produced it: the stage command, the version of what it computes (diet/versions.py),
its parameters and the hashes of its inputs (the base model and the prepared task), never the source text of
the code. The score bytes are the same at any thread count, so the committed dvc.lock names the files every
team produces. DVC also records the key in its run-cache. Team A pushes the score files *and* the run-cache
records (a record alone points at files the remote does not have). Team B, with the same model and task
definition, lets ``dvc repro --pull`` find the record and fetch the outputs instead of running the stage.
See docs/sharing.md.

    add_remote(".", "/mnt/shared/diet-cache")      # or s3://bucket/diet, once per clone
    push_scores(".")                                  # team A, after scoring
    pull_scores(".")                                  # team B: scores restored, none recomputed
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import pipeline_flow
from flows.repo import (FlowError, check_task_names, default_remote, ensure_repo, lock_stages, read_params,
                        run_dvc)


def add_remote(repo: str | Path, url: str, name: str = "shared", default: bool = True) -> None:
    """``dvc remote add [-d] -f <name> <url>``: a folder, ``s3://``, ``gs://``, ``ssh://``... (the cloud
    ones need ``pip install 'dvc[s3]'`` etc.)."""
    root = ensure_repo(repo)
    run_dvc(["remote", "add", "--force", *(["--default"] if default else []), name, url], root)


#: the stages whose outputs another team needs to skip the costly work: every task's scores (and, with their
#: deps, the model and prepared tasks), the generic-text scores of the task-agnostic baseline, and the dense
#: model's per-task evaluations, computed once for every team
SHARED_PER_TASK = ("score", "evaluate_dense")
SHARED = ("score_generic", "perplexity_dense")


def score_stages(repo: Path, tasks: list[str] | None = None) -> list[str]:
    """The shared stages of ``tasks`` (default: the params' tasks) plus the task-independent shared stages."""
    tasks = check_task_names(tasks if tasks else read_params(repo).get("tasks") or [])
    return [f"{s}@{t}" for t in tasks for s in SHARED_PER_TASK] + list(SHARED)


def push_scores(repo: str | Path = ".", remote: str | None = None, tasks: list[str] | None = None,
                with_deps: bool = True) -> dict[str, Any]:
    """Upload the task scores recorded in dvc.lock and the run-cache to ``remote`` (default: the default one).

    ``with_deps`` also uploads what the scores were computed from (the base model and the prepared tasks), so
    another clone can restore the whole chain without running it. Returns the targets and DVC's output.
    """
    root = ensure_repo(repo)
    wanted = score_stages(root, tasks)
    locked = lock_stages(root)
    targets = [s for s in wanted if s in locked]
    if not any(t.startswith("score@") for t in targets):
        raise FlowError(f"no task scores to push: none of {', '.join(w for w in wanted if w.startswith('score@'))} "
                        "is in dvc.lock", "run the pipeline first (diet-flow run), then push")
    if not remote and not default_remote(root):
        raise FlowError("no DVC remote to push to", "add one: dvc remote add -d shared /path/or/url (see docs/sharing.md)")
    args = ["push", "--run-cache", *(["-r", remote] if remote else []), *(["--with-deps"] if with_deps else []),
            *targets]
    res = run_dvc(args, root)
    return {"targets": targets, "output": res.output}


def prepare_pull(repo: str | Path, tasks: list[str] | None = None) -> list[str]:
    """Check a pull before any flow starts, and add ``tasks`` missing from params.yaml to its task list.

    Returns the tasks added. Fails, changing nothing, when the repo has no default remote or a task has no task
    file (or an invalid name).
    """
    from flows.repo import check_tasks, write_params

    root = ensure_repo(repo)
    if not default_remote(root):
        raise FlowError("no default DVC remote: `dvc repro --pull` only reads the default one",
                        "add the team's remote as default: dvc remote add -d shared /path/or/url "
                        "(or pass --add-remote URL)")
    check_tasks(root, tasks or [])
    current = list(read_params(root).get("tasks") or [])
    added = [t for t in tasks or [] if t not in current]
    if added:
        write_params(root, {"tasks": current + added})
    return added


@flow(name="diet-pull-scores")
def pull_scores(repo: str = ".", tasks: list[str] | None = None, params: dict[str, Any] | None = None,
                all_stages: bool = False, task_runner: str = "threads", workers: int = 2,
                address: str | None = None, retries: int = 1) -> dict[str, str]:
    """Bring the task scores (and the run-cache) from the default remote into this clone.

    Tasks not yet in params.yaml are added to it. Runs the shared stages (scores, generic scores, the dense
    model's evaluations; ``all_stages``: the whole pipeline) with ``dvc repro --pull``: an output another team
    pushed for the same model, task and settings is restored, not recomputed; only what nobody computed runs
    here. Returns the pipeline report: ``{stage: "ran" | "cached"}``.
    """
    root = ensure_repo(repo)
    prepare_pull(root, tasks)
    targets = None
    if not all_stages:
        overridden = params.get("tasks") if params else None
        targets = score_stages(root, tasks or overridden)
    report = pipeline_flow(repo=str(root), params=params, targets=targets, pull=True, task_runner=task_runner,
                           workers=workers, address=address, retries=retries)
    reused = [s for s, st in report.items() if s.startswith("score@") and st == "cached"]
    get_run_logger().info("scores reused: %s", ", ".join(reused) or "none")
    return report
