"""DVC stage `merge`: per-task scores of the tasks in params -> one priority per dimension (majority vote).

What a method reads beyond the task scores is a fact of its entry in diet.registry.MERGE_METHODS: `generic`
(the generic score file's scores: `task_agnostic`), `moments` (that file's activation moments, with the model's
weights: `wanda_sp`, `flap`), `magnitude` (the model's weight norms). With `prune.recover: bias` the score files
whose means the prune stage will fold are checked here, so a file without moments fails before any pruning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.merge")


def main(args, params) -> None:
    set_threads(single=True)
    from diet.geometry import geometry_from_folder
    from diet.io import atomic_dir, save_tensors, write_json, write_text
    from diet.merge import magnitude_scores, merge_scores, moment_baseline_scores, recovery_means_from_files
    from diet.plots import per_layer_chart
    from diet.registry import MERGE_METHODS
    from diet.scorefile import model_fingerprint, read_moments, read_scores

    fingerprint = model_fingerprint(args.model)
    method = params.merge.method
    inputs = MERGE_METHODS.facts(method).inputs
    # The task list comes from params, never from the folder: a removed task's file may linger there.
    task_scores = {t: read_scores(args.scores / f"{t}.safetensors", expect_fingerprint=fingerprint,
                                  expect_task=t)[0] for t in params.tasks}
    if params.prune.recover == "bias":
        recovery_means_from_files(method, params.prune.groups, generic_file=args.generic,  # fail before prune
                                  task_files={t: args.scores / f"{t}.safetensors" for t in params.tasks},
                                  weights=params.merge.weights, expect_fingerprint=fingerprint)
    generic = magnitude = baseline = None
    if "generic" in inputs:
        generic = read_scores(args.generic, expect_fingerprint=fingerprint, expect_task="generic")[0]
    if "magnitude" in inputs or "moments" in inputs:
        from diet.checkpoint import load_model

        model = load_model(args.model, dtype=params.model.dtype)
        if "magnitude" in inputs:
            magnitude = magnitude_scores(model, groups=params.prune.groups)
        if "moments" in inputs:
            moments = read_moments(args.generic, expect_fingerprint=fingerprint, groups=params.prune.groups,
                                   expect_task="generic")
            baseline = moment_baseline_scores(method, model, moments, groups=params.prune.groups)
    geo = geometry_from_folder(args.model, groups=tuple(next(iter(task_scores.values())).keys()))
    merged = merge_scores(task_scores, geo, merge_cfg=params.merge, prune_cfg=params.prune,
                          generic=generic, magnitude=magnitude, baseline=baseline)
    tensors = {f"{g}.{k}": v for g, m in merged.items() for k, v in m.items()}
    lines = ["group,layer,agreement"] + [f"{g},{i},{float(a):.6f}" for g, m in merged.items()
                                         for i, a in enumerate(m["agreement"])]
    with atomic_dir(args.out) as tmp:
        save_tensors(tmp / "votes.safetensors", tensors)
        write_text(tmp / "agreement.csv", "\n".join(lines) + "\n")
        per_layer_chart(tmp / "agreement.png", {g: [float(a) for a in m["agreement"]] for g, m in merged.items()},
                        ylabel="mean pairwise Jaccard", title="Task agreement per layer (the tasks' keep sets)")
        write_json(tmp / "merge.json", {"method": method, "normalize": params.merge.normalize,
                                        "tasks": list(params.tasks), "weights": params.merge.weights,
                                        "sparsity": params.prune.sparsity, "groups": list(params.prune.groups),
                                        "model_fingerprint": fingerprint})
    log.info("merged %d task(s) with method %s -> %s", len(task_scores), method, args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--scores", default="scores", type=Path)
    p.add_argument("--generic", default="baselines/generic.safetensors", type=Path)
    p.add_argument("--out", default="merged", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
