"""What every stage entry point shares: argument parsing, offline-friendly defaults, error reporting (with the
command of this pipeline that regenerates the artifact an error names: ``pipeline_fix``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Callable

from diet.config import Params, load_params
from diet.errors import DietError

log = logging.getLogger("diet")

#: the DVC command (dvc.yaml's stages) that regenerates each kind of artifact a DietError can name
#: (``diet.errors.ARTIFACTS``), as printed after the fix; ``{name}`` is the task of a per-task kind
PIPELINE_COMMANDS = {
    "base_model": "`dvc repro model`",
    "pruned_model": "`dvc repro prune`",
    "checkpoint": "`dvc repro model` (models/base) or `dvc repro prune` (models/pruned)",
    "prepared_task": "`dvc repro prepare@{name}`",
    "task_scores": "`dvc repro -f score@{name}`",
    "generic_scores": "`dvc repro -f score_generic`",
    "merged": "`dvc repro merge`",
    "mask": "`dvc repro select`",
    "evaluation": "`dvc repro evaluate@{name}`",
    "dense_evaluation": "`dvc repro evaluate_dense@{name}`",
    "perplexity": "`dvc repro perplexity`",
    "dense_perplexity": "`dvc repro perplexity_dense`",
    "gguf": "`dvc repro export`",
}
#: a per-task kind named without a task (``diet.errors.PER_TASK``): the command that reruns every task's stage
#: of that kind (after a params change, so not forced)
EVERY_TASK = {
    "prepared_task": "`dvc repro prepare`",
    "task_scores": "`dvc repro score`",
    "evaluation": "`dvc repro evaluate`",
    "dense_evaluation": "`dvc repro evaluate_dense`",
}


def pipeline_command(artifact: str) -> str:
    """The command text that regenerates ``artifact`` (``"<kind>"`` or ``"<kind>:<task>"``) in this pipeline."""
    kind, _, name = artifact.partition(":")
    if not name and kind in EVERY_TASK:
        return EVERY_TASK[kind]
    return PIPELINE_COMMANDS[kind].format(name=name)


def pipeline_fix(error: DietError) -> str | None:
    """The one-line fix the stages and the flows print for ``error``: its own fix, then, when it names an
    artifact, ``in the pipeline: <the command that regenerates it>``."""
    if not error.artifact:
        return error.fix
    command = f"in the pipeline: {pipeline_command(error.artifact)}"
    return f"{error.fix}; {command}" if error.fix else command


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DIET_DEBUG=1)")
    return p


def run_stage(main: Callable[[argparse.Namespace, Params], None], parser: argparse.ArgumentParser,
              argv: list[str] | None = None) -> int:
    """Parse args and params, run ``main``. A DietError prints ``error: <problem>`` and ``  fix: <fix>`` (with
    the command that regenerates the artifact it names: ``pipeline_fix``) and exits 2; any other exception prints one line naming it and exits 1; an interrupt (Ctrl-C) prints one line
    and exits 130. ``--debug`` or DIET_DEBUG=1 re-raise."""
    logging.basicConfig(level=os.environ.get("DIET_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parser.parse_args(argv)
    record_run()
    interrupts, previous = _count_interrupts()
    try:
        main(args, load_params(args.params))
        if interrupts:  # a library swallowed the KeyboardInterrupt (a bare except): the user still asked to stop
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if getattr(args, "debug", False) or os.environ.get("DIET_DEBUG", "") not in ("", "0"):
            raise
        stage = os.environ.get("DVC_STAGE") or parser.prog
        print(f"interrupted: {stage}; its outputs are written whole or not at all, so nothing half-done was kept. "
              "Rerun `dvc repro` to resume: finished stages are not run again.", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or os.environ.get("DIET_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, DietError):
            return _report(e.problem, pipeline_fix(e), 2)
        if isinstance(e, OSError) and e.filename:     # a full disk, a folder not writable, a file gone
            return _report(f"{e.strerror or type(e).__name__}: {e.filename}",
                           "check the path, its permissions and the free disk space, then rerun `dvc repro` (stages "
                           "that finished are kept; outputs are written whole or not at all)", 2)
        text = str(e).strip().splitlines()
        return _report(f"unexpected {type(e).__name__}: {text[0] if text else '(no message)'}",
                       "rerun with --debug (or DIET_DEBUG=1) for the traceback, and report it if the input is "
                       "correct", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def _count_interrupts() -> tuple[list[int], object]:
    """Ctrl-C raises KeyboardInterrupt as Python does, and is also recorded in the returned list; with it the
    handler it replaced, to put back (None outside the main thread, where nothing is installed)."""
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return seen, None
    return seen, signal.signal(signal.SIGINT, handler)


#: a file to which every stage run under DVC appends its stage name (set by the flows, which read it back to
#: tell a stage that ran from one DVC skipped or restored from its cache)
RUN_LOG = "DIET_RUN_LOG"


def record_run() -> None:
    """Append ``{"stage": $DVC_STAGE}`` as one JSON line to ``$DIET_RUN_LOG`` when both are set, with
    ``"experiment": $DVC_EXP_NAME`` when DVC runs the stage inside a named experiment (a queued one)."""
    path, stage = os.environ.get(RUN_LOG), os.environ.get("DVC_STAGE")
    if path and stage:
        line = {"stage": stage, "pid": os.getpid()}
        if os.environ.get("DVC_EXP_NAME"):
            line["experiment"] = os.environ["DVC_EXP_NAME"]
        with open(path, "a") as f:  # one short append per run: lines of parallel stages never interleave
            f.write(json.dumps(line) + "\n")


def _report(problem: str, fix: str | None, code: int) -> int:
    print(f"error: {problem}", file=sys.stderr)
    if fix:
        print(f"  fix: {fix}", file=sys.stderr)
    return code


def set_threads(single: bool = False) -> None:
    """Respect OMP_NUM_THREADS when set; torch otherwise takes every core. ``single``: one kernel thread
    whatever the environment says, for the stages that take seconds, so that their outputs (a merged score, a
    pruned model with recovered biases) are the same bytes at any thread count (diet.parallel)."""
    n = "1" if single else os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch

        torch.set_num_threads(int(n))

