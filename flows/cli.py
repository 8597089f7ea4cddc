"""``diet-flow``: run, sweep, schedule and share the DIET pipeline (a thin layer over flows/).

    diet-flow run --set prune.sparsity=0.3 --runner dask --workers 2
    diet-flow run --runner dask --address tcp://head:8786 --no-shared-disk --git-url URL   # workers' own clones
    diet-flow sweep --sparsities 0.1,0.2,0.3 --methods vote,task_agnostic
    diet-flow serve --config flows/schedule.yaml          # needs PREFECT_API_URL
    diet-flow push --remote shared                         # team A
    diet-flow pull                                         # team B
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import yaml

from diet.errors import DietError
from flows.repo import CHILD_ENV, FlowError, check_task_names
from flows.server import flow_server
from stages._common import pipeline_fix


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["prune.sparsity=0.3", "tasks=[arc_easy, boolq]"]`` -> ``{"prune.sparsity": 0.3, "tasks": [...]}``
    (values are read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlowError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set prune.sparsity=0.3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _count(least: int):
    """An argparse type: a whole number of at least ``least`` (``--workers 0`` fails here, not mid-flow)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}, the least this option takes")
        return value
    return parse


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _task_names(text: str) -> list[str]:
    """``--tasks a,b``: each name must follow the task-name rule (it becomes a path and a stage name)."""
    try:
        return check_task_names(_names(text))
    except DietError as e:
        raise argparse.ArgumentTypeError(f"{e.problem} ({pipeline_fix(e)})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diet-flow", description="Run, sweep, schedule and share the DIET pipeline.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,sweep,loto,report,serve,push,pull}")

    def common(q: argparse.ArgumentParser, runner: bool = True) -> None:
        q.add_argument("--repo", default=".", help="the DIET project (a git + DVC repo; default: .)")
        q.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                       help="override params.yaml, e.g. prune.sparsity=0.3 (repeatable; values are YAML)")
        if runner:
            q.add_argument("--runner", default="threads", choices=("threads", "dask", "ray"),
                           help="where independent stages run side by side (default: threads)")
            q.add_argument("--workers", type=_count(1), default=2, help="parallel stages (default: 2)")
            q.add_argument("--address", help="dask scheduler / ray cluster address (default: a local one)")
            q.add_argument("--retries", type=_count(0), default=1,
                           help="retries of a failed stage, or of a failed experiment in a queued sweep (default: 1)")

    def experiments(q: argparse.ArgumentParser) -> None:
        q.add_argument("--mode", choices=("queue", "workspace"), default="queue",
                       help="queue: DVC's experiment queue, --jobs points at a time in temporary copies (the "
                            "workspace is left alone); workspace: one point after the other in the workspace "
                            "(default: queue)")
        q.add_argument("--jobs", type=_count(1), help="experiments run at a time in queue mode (default: --workers)")

    q = sub.add_parser("run", help="run the pipeline: every stage, each as a Prefect task over `dvc repro -s`")
    common(q)
    q.add_argument("--target", dest="targets", action="append", metavar="STAGE",
                   help="run only this stage and its upstream ones (repeatable)")
    q.add_argument("--pull", action="store_true", help="fetch missing outputs and run-cache from the default remote")
    q.add_argument("--no-shared-disk", dest="shared_disk", action="store_false",
                   help="workers share no folder with this one: each runs its stages in its own git clone at this "
                        "commit (with this params.yaml and dvc.lock), pulls their inputs from the default DVC "
                        "remote and pushes their outputs and run-cache there; this workspace then pulls them")
    q.add_argument("--git-url", metavar="URL",
                   help="with --no-shared-disk: where workers clone the project from; HEAD must be on a branch or "
                        "tag there (default: this repository's path, for workers on this machine)")
    q.add_argument("--workdir", metavar="DIR",
                   help="with --no-shared-disk: the folder on each worker that holds its clones (default: "
                        "<worker's temporary folder>/diet-workers)")

    q = sub.add_parser("sweep", help="one DVC experiment per (method, sparsity); table, markdown and plot")
    common(q)
    q.add_argument("--sparsities", type=_floats, default=[0.1, 0.2, 0.3], help="comma-separated (default: 0.1,0.2,0.3)")
    q.add_argument("--methods", type=_names, default=["vote"],
                   help="comma-separated merge methods, each optionally with a recovery: vote,flap,flap+bias "
                        "(default: vote)")
    q.add_argument("--groups", type=_names, default=None,
                   help="comma-separated combinations of dimension groups to prune, each joined by +, e.g. "
                        "mlp,hidden,mlp+attention+hidden (default: params.yaml's prune.groups; every group "
                        "must be in score.groups)")
    q.add_argument("--vary", action="append", metavar="KEY=VALUE",
                   help="an ablation: per point, one more experiment with this params change, compared with the "
                        "point without it, e.g. --vary score.statistic=l2 --vary merge.normalize=rank (repeatable)")
    experiments(q)

    q = sub.add_parser("loto", help="leave-one-task-out: per task, a mask merged without it, evaluated on it")
    common(q)
    q.add_argument("--methods", type=_names, default=["vote", "task_agnostic"],
                   help="comma-separated merge methods, each optionally with a recovery (default: vote,task_agnostic)")
    experiments(q)
    q.add_argument("--from-experiments", dest="from_experiments", action="append", metavar="PATTERN",
                   help="run nothing: write the table from finished experiments whose names match (shell-style, "
                        "repeatable), e.g. '*-20261129T0358*'")

    q = sub.add_parser("report", help="render the sweep table and plot again (results/sweep.csv, results/dense/summary.json)")
    q.add_argument("--repo", default=".", help="the DIET project (default: .)")
    q.add_argument("--csv", dest="csvs", action="append", metavar="PATH",
                   help="sweep tables to combine (repeatable; default: results/sweep.csv)")
    q.add_argument("--out", help="folder for the combined sweep.csv, sweep.md and accuracy_vs_sparsity.png "
                                 "(default: results/sweep.md and plots/accuracy_vs_sparsity.png)")
    q.add_argument("--experiments", action="append", metavar="PATTERN",
                   help="add rows read from finished DVC experiments whose names match (shell-style, repeatable), "
                        "e.g. 'vote-bias-s0.2-*'")
    q.add_argument("--latency", metavar="JSON",
                   help="add each row's prefill and decoding CPU time against the dense model's, from the JSON of "
                        "`python benchmarks/latency.py --experiments PATTERN --out JSON`")
    q.add_argument("--against", action="append", metavar="LABEL",
                   help="add every row's paired differences (mean acc, flip rate, KL, perplexity) from the row of "
                        "this label, e.g. wanda_sp or flap+bias (repeatable)")
    q.add_argument("--dense", help="dense metrics for the reference row, evaluated on as many items as the sweep "
                                   "(default: results/sweep-dense.json from the sweep, else results/dense/summary.json)")

    q = sub.add_parser("serve", help="serve the pipeline on a schedule (needs a Prefect server, PREFECT_API_URL)")
    q.add_argument("--config", help="schedule file (default: flows/schedule.yaml)")
    q.add_argument("--name", help="deployment name")
    q.add_argument("--cron", help='cron expression, e.g. "0 2 * * *" (replaces the file\'s schedule)')
    q.add_argument("--interval", type=float, help="seconds between runs (replaces the file's schedule)")
    q.add_argument("--repo", help="the DIET project to run (replaces parameters.repo)")

    q = sub.add_parser("push", help="upload task scores and the run-cache to a DVC remote")
    q.add_argument("--repo", default=".", help="the DIET project (default: .)")
    q.add_argument("--remote", help="remote name (default: the default remote)")
    q.add_argument("--tasks", type=_task_names, help="comma-separated tasks (default: params.yaml tasks)")
    q.add_argument("--no-deps", action="store_true", help="push only the score files, not the model and task data")
    q.add_argument("--add-remote", metavar="URL", help="first add URL as the default remote named 'shared'")

    q = sub.add_parser("pull", help="restore task scores from the default remote instead of computing them")
    common(q)
    q.add_argument("--tasks", type=_task_names, help="comma-separated tasks (default: params.yaml tasks)")
    q.add_argument("--all", dest="all_stages", action="store_true", help="the whole pipeline, not only scores")
    q.add_argument("--add-remote", metavar="URL", help="first add URL as the default remote named 'shared'")
    return p


def _quiet_user_error_tracebacks() -> None:
    """Prefect logs a failed flow or task with its traceback; for a DietError (a user's mistake, whose message
    names the problem and the fix) and for an interrupt (Ctrl-C) the log records keep the message alone."""
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.exc_info and isinstance(record.exc_info[1], (DietError, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return record

    logging.setLogRecordFactory(factory)


#: the signals that interrupted this command (the exit code is 128 + the first: 130 for Ctrl-C, 143 for SIGTERM)
_SIGNALLED: list[int] = []


def _quiet_after_interrupts() -> Callable[[], Any]:
    """Ctrl-C (SIGINT) or SIGTERM: the stages and DVC, which get the signal too, stop and say so; the flow
    records how it ended. What Prefect would log about each cancelled task is silenced, so that one line says
    what happened (``main``). Inside a flow Prefect's own SIGTERM handler takes over and ends the flow run
    crashed."""
    def handler(signum, frame):
        logging.disable(logging.CRITICAL)
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt

    _SIGNALLED.clear()  # a command run before in this process (a test) leaves none behind
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _interrupt(e: BaseException) -> bool:
    """Whether ``e`` is how an interrupt ends a command: KeyboardInterrupt, or Prefect's TerminationSignal."""
    if isinstance(e, KeyboardInterrupt):
        return True
    if "prefect" in sys.modules:
        from prefect.exceptions import TerminationSignal

        if isinstance(e, TerminationSignal):
            logging.disable(logging.CRITICAL)
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for k, v in CHILD_ENV.items():  # before Prefect is imported: it reads its settings once
        os.environ.setdefault(k, v)
    _quiet_user_error_tracebacks()
    restore = _quiet_after_interrupts()
    try:
        result = dispatch(args)
    except DietError as e:  # FlowError, and the configuration errors of diet.config
        print(f"error: {e.problem}", file=sys.stderr)
        fix = pipeline_fix(e)
        if fix:
            print(f"  fix: {fix}", file=sys.stderr)
        return 2
    except BaseException as e:
        if not _interrupt(e):
            raise
        print(f"interrupted: diet-flow {args.command}; every stage that finished is kept in DVC's cache, and no "
              "output is left half-written. Rerun the same command to resume.", file=sys.stderr)
        return 128 + (_SIGNALLED[0] if _SIGNALLED else signal.SIGINT if isinstance(e, KeyboardInterrupt)
                      else signal.SIGTERM)
    finally:
        restore()
        logging.disable(logging.NOTSET)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def dispatch(args: argparse.Namespace) -> Any:
    if args.command == "run":
        from flows.pipeline import nothing_to_do, pipeline_flow, validate_run

        validate_run(args.repo, parse_sets(args.sets))  # bad input fails before a Prefect server starts
        if args.shared_disk and (args.git_url or args.workdir):
            raise FlowError("--git-url and --workdir apply to workers without a shared disk",
                            "add --no-shared-disk, or drop them")
        if not args.shared_disk:
            from flows.remote_workers import check_workspace

            check_workspace(args.repo, args.git_url)
        done = None if args.pull or not args.shared_disk else nothing_to_do(args.repo, parse_sets(args.sets),
                                                                            args.targets)
        if done is not None:
            print(f"nothing to do: dvc status finds all {len(done)} stages up to date; no flow was started",
                  file=sys.stderr)
            return done
        with flow_server():
            return pipeline_flow(repo=args.repo, params=parse_sets(args.sets), task_runner=args.runner,
                                 workers=args.workers, address=args.address, targets=args.targets, pull=args.pull,
                                 retries=args.retries, shared_disk=args.shared_disk, git_url=args.git_url,
                                 workdir=args.workdir)
    if args.command in ("sweep", "loto"):
        from flows.pipeline import validate_run
        from flows.points import check_points, make_points, parse_variant
        from flows.sweep import sweep_flow

        root = validate_run(args.repo, parse_sets(args.sets))
        # a point that cannot run, or an unknown method, fails before a Prefect server starts
        if args.command == "sweep":
            check_points(root, parse_sets(args.sets), make_points(args.sparsities, args.methods, args.groups,
                                                                   args.vary))
        else:
            for method in args.methods:
                parse_variant(method)
        if args.command == "loto" and args.from_experiments:
            from flows.loto import loto_report

            return {"files": loto_report(args.repo, args.from_experiments, args.methods)["files"]}
        if args.command == "loto":
            from flows.loto import loto_flow

            with flow_server():
                out = loto_flow(repo=args.repo, methods=args.methods, params=parse_sets(args.sets),
                                task_runner=args.runner, workers=args.workers, address=args.address,
                                retries=args.retries, mode=args.mode, jobs=args.jobs)
            return {"files": out["files"]}

        with flow_server():
            out = sweep_flow(repo=args.repo, sparsities=args.sparsities, methods=args.methods, groups=args.groups,
                             vary=args.vary, params=parse_sets(args.sets), task_runner=args.runner,
                             workers=args.workers, address=args.address, retries=args.retries, mode=args.mode,
                             jobs=args.jobs)
        return {"files": out["files"], "shared": out["shared"]}
    if args.command == "serve":
        from flows.schedule import load_schedule, serve_pipeline

        config = load_schedule(args.config, name=args.name, cron=args.cron, interval=args.interval, repo=args.repo)
        serve_pipeline(config)
        return None
    if args.command == "push":
        from flows.share import add_remote, push_scores

        if args.add_remote:
            add_remote(args.repo, args.add_remote)
        out = push_scores(args.repo, remote=args.remote, tasks=args.tasks, with_deps=not args.no_deps)
        print(out["output"].rstrip())
        return {"pushed": out["targets"]}
    if args.command == "pull":
        from flows.pipeline import validate_run
        from flows.repo import check_tasks
        from flows.share import add_remote, prepare_pull, pull_scores

        # bad input fails here, before the remote is written or a Prefect server starts
        check_tasks(validate_run(args.repo, parse_sets(args.sets)), args.tasks or [])
        if args.add_remote:
            add_remote(args.repo, args.add_remote)
        prepare_pull(args.repo, args.tasks)
        with flow_server():
            return pull_scores(repo=args.repo, tasks=args.tasks, params=parse_sets(args.sets),
                               all_stages=args.all_stages, task_runner=args.runner, workers=args.workers,
                               address=args.address, retries=args.retries)
    if args.command == "report":
        from flows.sweep_report import report

        print(report(args.repo, csvs=args.csvs, out=args.out, dense=args.dense, experiments=args.experiments,
                     latency=args.latency, against=args.against))
        return None
    raise AssertionError(args.command)  # argparse restricts the choices


if __name__ == "__main__":
    sys.exit(main())
