"""DVC stage `prune`: physically remove the masked dimensions and save a loadable checkpoint.

With `prune.recover: bias` the removed dimensions' calibration means are folded into the output projections'
biases: from the tasks' score files (`--scores`) for vote / mean / rank, from the generic one (`--generic`)
for the other methods (diet.merge.means_source). With `refit` / `refit_bias` the kept weights of each output
projection are solved for on calibration text (diet.refit): the tasks' calibration samples (`--tasks-dir`,
merge.weights honoured) for vote / mean / rank, the first `prune.refit_samples` of each; as many generic
texts in all for the other methods. Each task's calibration file must be the one its score file was computed
from (``diet.scorefile.check_scored_data``): the stage depends on the score files, not on the prepared tasks,
so a new evaluate.limit (which prepares the tasks again, with the same calibration files) does not rerun it.
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

    weights = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    check_writable(args.out, need_bytes=int(weights * (1 - params.prune.sparsity)))  # before the work, not after
    from diet.merge import means_source, recovery_means_from_files
    from diet.checkpoint import load_model_and_tokenizer
    from diet.checkpoint import save_pruned
    from diet.pruning import apply_mask
    from diet.geometry import parameter_counts
    from diet.scorefile import model_fingerprint
    from diet.adapters import get_adapter
    from diet.groups import GROUPS
    from diet.config import REFITS
    from diet.mask import Mask, check_fits

    mask = Mask.load(args.mask)
    fingerprint = model_fingerprint(args.model)
    means = None
    if params.prune.recover == "bias":  # read (and checked) before the model is loaded
        means = recovery_means_from_files(
            params.merge.method, sorted(mask.keep), generic_file=args.generic,
            task_files={t: args.scores / f"{t}.safetensors" for t in params.tasks},
            weights=params.merge.weights, expect_fingerprint=fingerprint)
    texts = refit_texts(args, params, mask) if params.prune.recover in REFITS else None
    priors = None
    if params.prune.refit_choose == "obs":
        from diet.select import read_priority

        priors = read_priority(args.merged / "votes.safetensors", ["mlp"], mask.base_widths)
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    check_fits(mask, {g: GROUPS[g].widths(get_adapter(model)) for g in mask.base_widths}, args.mask, args.model)
    before = parameter_counts(model)
    refitted, keep = None, mask.keep_tensors()
    if texts is not None:
        refitted, keep = run_refit(model, tokenizer, texts, keep, params, priors)
    apply_mask(model, keep, params.select.layout, means=means)
    after = parameter_counts(model)
    manifest = {"base_model_fingerprint": fingerprint, "mask": mask.summary(),
                "params_before": before, "params_after": after, "layout": params.select.layout,
                "recover": params.prune.recover,
                "recover_means": means_source(params.merge.method) if means is not None else None,
                "method": params.merge.method, "tasks": list(params.tasks)}
    if refitted is not None:
        manifest["refit"] = refitted
    source = args.model / "diet_source.json"
    save_pruned(model, tokenizer, args.out, manifest, read_json(source) if source.is_file() else None)
    log.info("pruned: decoder %.1fM -> %.1fM parameters, total %.1fM -> %.1fM -> %s",
             before["decoder"] / 1e6, after["decoder"] / 1e6, before["total"] / 1e6, after["total"] / 1e6, args.out)


def refit_texts(args, params, mask) -> dict[str, list[str]]:
    """The refit's calibration texts by source, read (and checked) before the model is loaded."""
    from diet.merge import means_source
    from diet.config import check_refit_groups

    check_refit_groups(mask.keep, "the mask's groups")
    n = params.prune.refit_samples
    if means_source(params.merge.method) == "generic":
        from diet.generic import generic_texts

        # as many generic texts as the task methods get samples in all
        count = (n or params.calibration.n_samples) * len(params.tasks)
        return {"generic": generic_texts(count, params.calibration.seed)}
    from diet.scorefile import check_scored_data
    from diet.tasks import read_calibration

    weights = params.merge.weights
    chosen = [t for t in params.tasks if float(weights.get(t, 1.0)) > 0]
    for t in chosen:  # the stage depends on the score files, which pin the calibration text (dvc.yaml)
        check_scored_data(args.scores / f"{t}.safetensors", args.tasks_dir / t / "calib.jsonl", t)
    return {t: read_calibration(args.tasks_dir / t / "calib.jsonl", t)[:n] for t in chosen}


def run_refit(model, tokenizer, texts: dict[str, list[str]], keep, params, priors=None) -> tuple[dict, dict]:
    """``diet.refit.refit_on_texts``: (the manifest's summary of it, the dimensions to keep)."""
    from diet.refit import refit_on_texts

    done, stats = refit_on_texts(
        model, tokenizer, texts, keep, weights=params.merge.weights if "generic" not in texts else None,
        max_length=params.calibration.max_length, batch_size=params.score.batch_size,
        damping=params.prune.refit_damping, bias=params.prune.recover == "refit_bias", priors=priors)
    return {"sources": sorted(texts), **stats, "damping": params.prune.refit_damping,
            "choose": params.prune.refit_choose, "groups": done.summary()}, done.keep


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--mask", default="masks/mask.json", type=Path)
    p.add_argument("--scores", default="scores", type=Path, help="the tasks' score files (prune.recover: bias)")
    p.add_argument("--generic", default="baselines/generic.safetensors", type=Path,
                   help="the generic score file (prune.recover: bias with a method that ranks without the tasks)")
    p.add_argument("--merged", default="merged", type=Path,
                   help="the merged priorities (prune.refit_choose: obs takes them as its prior)")
    p.add_argument("--tasks-dir", default="data/tasks", type=Path,
                   help="the prepared tasks (<task>/calib.jsonl: prune.recover: refit with a task method; each checked "
                        "against its score file)")
    p.add_argument("--out", default="models/pruned", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
