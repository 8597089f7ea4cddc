"""DVC stage `model`: materialise the base model into models/base/."""

from __future__ import annotations

import sys

from stages._common import run_stage, set_threads, stage_parser


def main(args, params) -> None:
    set_threads()
    from diet.model_sources import materialise

    cfg = params.model
    materialise(cfg.source, args.out, dtype=cfg.dtype, revision=cfg.revision)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--out", default="models/base", help="output folder (default: models/base)")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
