"""DVC stage `prune`: physically remove the masked dimensions and save a loadable checkpoint."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.prune")


def main(args, params) -> None:
    set_threads()
    from diet.modeling import load_model_and_tokenizer
    from diet.modeling import save_pruned
    from diet.pruning import apply_mask, parameter_counts
    from diet.scoring import model_fingerprint
    from diet.select import Mask

    mask = Mask.load(args.mask)
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype)
    before = parameter_counts(model)
    apply_mask(model, mask.keep_tensors(), params.select.layout)
    after = parameter_counts(model)
    manifest = {"base_model_fingerprint": model_fingerprint(args.model), "mask": mask.summary(),
                "params_before": before, "params_after": after, "layout": params.select.layout}
    save_pruned(model, tokenizer, args.out, manifest)
    log.info("pruned: decoder %.1fM -> %.1fM parameters, total %.1fM -> %.1fM -> %s",
             before["decoder"] / 1e6, after["decoder"] / 1e6, before["total"] / 1e6, after["total"] / 1e6, args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--mask", default="masks/mask.json", type=Path)
    p.add_argument("--out", default="models/pruned", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
