"""What every stage entry point shares: argument parsing, offline-friendly defaults, error reporting."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from diet.config import Params, load_params
from diet.errors import DietError

log = logging.getLogger("diet")


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run_stage(main: Callable[[argparse.Namespace, Params], None], parser: argparse.ArgumentParser,
              argv: list[str] | None = None) -> int:
    """Parse args and params, run ``main``; a DietError becomes a one-screen message and exit code 2."""
    logging.basicConfig(level=os.environ.get("DIET_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parser.parse_args(argv)
    record_run()
    try:
        params = load_params(args.params)
        main(args, params)
    except DietError as e:
        print(f"error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    return 0


#: a file to which every stage run under DVC appends its stage name (set by the flows, which read it back to
#: tell a stage that ran from one DVC skipped or restored from its cache)
RUN_LOG = "DIET_RUN_LOG"


def record_run() -> None:
    """Append ``{"stage": $DVC_STAGE}`` as one JSON line to ``$DIET_RUN_LOG`` when both are set."""
    path, stage = os.environ.get(RUN_LOG), os.environ.get("DVC_STAGE")
    if path and stage:
        with open(path, "a") as f:  # one short append per run: lines of parallel stages never interleave
            f.write(json.dumps({"stage": stage, "pid": os.getpid()}) + "\n")


def set_threads() -> None:
    """Respect OMP_NUM_THREADS when set; torch otherwise takes every core."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch

        torch.set_num_threads(int(n))

