"""DVC stage `select`: merged priorities -> the global mask (masks/mask.json) under the parameter budget."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.select")


def main(args, params) -> None:
    set_threads(single=True)
    from diet.geometry import geometry_from_folder
    from diet.io import write_text
    from diet.plots import per_layer_chart
    from diet.select import check_constraints, read_priority, select

    geo = geometry_from_folder(args.model, groups=params.prune.groups)  # from the config: no weights read
    check_constraints(geo.widths, params.prune.groups, params.select.min_keep, params.select.multiple)
    priority = read_priority(args.merged / "votes.safetensors", params.prune.groups, geo.widths)
    mask = select(priority, geo.widths, geo.costs, sparsity=params.prune.sparsity,
                  decoder_params=geo.decoder_params, min_keep=params.select.min_keep,
                  multiple=params.select.multiple, layout=params.select.layout, crossings=geo.crossings)
    mask.save(args.out)
    rows = ["group,layer,kept,width"] + [f"{g},{i},{k},{w}" for g in mask.widths
                                         for i, (k, w) in enumerate(zip(mask.widths[g], mask.base_widths[g]))]
    write_text(args.out.parent / "widths.csv", "\n".join(rows) + "\n")
    per_layer_chart(args.out.parent / "widths.png", mask.widths, reference=mask.base_widths, ylabel="kept width",
                    title=f"Kept width per layer ({mask.summary()['achieved_sparsity']:.1%} of decoder parameters removed)")
    s = mask.summary()
    log.info("mask: %.2f%% of decoder parameters removed (target %.2f%%), %s layout -> %s",
             100 * s["achieved_sparsity"], 100 * s["target_sparsity"], s["layout"], args.out)
    for g, info in s["groups"].items():
        log.info("  %s widths per layer: %s", g, info["widths"])


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--merged", default="merged", type=Path)
    p.add_argument("--out", default="masks/mask.json", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
