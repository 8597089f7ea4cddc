"""DVC stage `prune`: physically remove the masked dimensions and save a loadable checkpoint.

With `prune.recover: bias` the removed dimensions' calibration means are folded into the output projections'
biases: from the tasks' score files (`--scores`) for vote / mean / rank, from the generic one (`--generic`)
for the other methods (diet.merge.means_source).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.prune")


def main(args, params) -> None:
    set_threads(single=True)
    from diet.io import check_writable, read_json

    check_writable(args.out)  # before the model is loaded, not after the work
    from diet.merge import means_source, recovery_means_from_files
    from diet.modeling import load_model_and_tokenizer
    from diet.modeling import save_pruned
    from diet.pruning import apply_mask, parameter_counts
    from diet.scoring import model_fingerprint
    from diet.adapters import get_adapter
    from diet.select import Mask, check_fits

    mask = Mask.load(args.mask)
    fingerprint = model_fingerprint(args.model)
    means = None
    if params.prune.recover == "bias":  # read (and checked) before the model is loaded
        means = recovery_means_from_files(
            params.merge.method, sorted(mask.keep), generic_file=args.generic,
            task_files={t: args.scores / f"{t}.safetensors" for t in params.tasks},
            weights=params.merge.weights, expect_fingerprint=fingerprint)
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    check_fits(mask, {g: get_adapter(model).group_widths(g) for g in mask.base_widths}, args.mask, args.model)
    before = parameter_counts(model)
    apply_mask(model, mask.keep_tensors(), params.select.layout, means=means)
    after = parameter_counts(model)
    manifest = {"base_model_fingerprint": fingerprint, "mask": mask.summary(),
                "params_before": before, "params_after": after, "layout": params.select.layout,
                "recover": params.prune.recover,
                "recover_means": means_source(params.merge.method) if means is not None else None,
                "method": params.merge.method, "tasks": list(params.tasks)}
    source = args.model / "diet_source.json"
    save_pruned(model, tokenizer, args.out, manifest, read_json(source) if source.is_file() else None)
    log.info("pruned: decoder %.1fM -> %.1fM parameters, total %.1fM -> %.1fM -> %s",
             before["decoder"] / 1e6, after["decoder"] / 1e6, before["total"] / 1e6, after["total"] / 1e6, args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--mask", default="masks/mask.json", type=Path)
    p.add_argument("--scores", default="scores", type=Path, help="the tasks' score files (prune.recover: bias)")
    p.add_argument("--generic", default="baselines/generic.safetensors", type=Path,
                   help="the generic score file (prune.recover: bias with a method that ranks without the tasks)")
    p.add_argument("--out", default="models/pruned", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
