"""What every stage entry point shares: argument parsing, offline-friendly defaults, error reporting."""

from __future__ import annotations

import argparse
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
    try:
        params = load_params(args.params)
        main(args, params)
    except DietError as e:
        print(f"error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    return 0


def set_threads() -> None:
    """Respect OMP_NUM_THREADS when set; torch otherwise takes every core."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch

        torch.set_num_threads(int(n))


def load_model_and_tokenizer(path, dtype: str = "float32"):
    """A saved checkpoint folder (base or pruned) and its tokenizer."""
    from transformers import AutoTokenizer

    from diet.modeling import load_model

    return load_model(path, dtype=dtype), AutoTokenizer.from_pretrained(str(path))
