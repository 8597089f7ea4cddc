"""DVC stage `prune`: physically remove the masked dimensions and save a loadable checkpoint."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import load_model_and_tokenizer, run_stage, set_threads, stage_parser

log = logging.getLogger("diet.prune")


def main(args, params) -> None:
    set_threads()
    from diet import api
    from diet.modeling import save_pruned
    from diet.pruning import parameter_counts
    from diet.scoring import model_fingerprint
    from diet.adapters import get_adapter
    from diet.select import Mask, check_fits

    mask = Mask.load(args.mask)
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype)
    check_fits(mask, {g: get_adapter(model).group_widths(g) for g in mask.base_widths}, args.mask, args.model)
    before = parameter_counts(model)
    api.apply(model, mask, params.select.layout)
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
