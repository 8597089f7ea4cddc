"""The DIET path as plain Python: score tasks, merge, select, prune. The DVC stages call these same functions.

    import diet
    pruned, mask = diet.prune(model, tokenizer, {"arc_easy": texts_a, "boolq": texts_b}, sparsity=0.2)

Each step is also available on its own (``score``, ``plan``, ``apply``) so a stage can cache its result.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch

from diet.config import MergeConfig, PruneConfig, ScoreConfig, SelectConfig, check_weights
from diet.errors import ConfigError
from diet.geometry import Geometry, geometry, geometry_from_folder
from diet.merge import merge_scores
from diet.scoring import score

__all__ = ["Geometry", "apply", "geometry", "geometry_from_folder", "merge_scores", "plan", "prune", "score"]

log = logging.getLogger(__name__)


def plan(task_scores: Mapping[str, Mapping[str, torch.Tensor]], geo: Geometry, *,
         merge_cfg: MergeConfig = MergeConfig(), prune_cfg: PruneConfig = PruneConfig(),
         select_cfg: SelectConfig = SelectConfig(), generic: Mapping[str, torch.Tensor] | None = None,
         magnitude: Mapping[str, torch.Tensor] | None = None, baseline: Mapping[str, torch.Tensor] | None = None):
    """Merge per-task scores into one order per group and select the mask: (merged, Mask).

    The configs are checked here, as params.yaml's sections are when read: the functions below trust them.
    """
    from diet.select import check_constraints, select

    for cfg in (merge_cfg, prune_cfg, select_cfg):
        cfg.validate()
    if task_scores:
        check_weights(merge_cfg.weights, sorted(task_scores))
    check_constraints(geo.widths, prune_cfg.groups, select_cfg.min_keep, select_cfg.multiple)
    merged = merge_scores(task_scores, geo, merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                          generic=generic, magnitude=magnitude, baseline=baseline)
    mask = select({g: m["priority"] for g, m in merged.items()}, geo.widths, geo.costs,
                  sparsity=prune_cfg.sparsity, decoder_params=geo.decoder_params, min_keep=select_cfg.min_keep,
                  multiple=select_cfg.multiple, layout=select_cfg.layout, crossings=geo.crossings)
    return merged, mask


def apply(model, mask, layout: str | None = None, means: Mapping[str, torch.Tensor] | None = None):
    """Physically remove what ``mask`` drops; returns the (same, now smaller) model.

    ``means`` (``{group: (L, D)}``, from ``diet.merge.recovery_means``) folds the removed channels' calibration
    means into the output projections' biases (``prune.recover: bias``).
    """
    from diet.pruning import apply_mask

    return apply_mask(model, mask.keep_tensors(), layout or mask.layout,
                      means=dict(means) if means is not None else None)


def prune(model, tokenizer, tasks: Mapping[str, Sequence[str]], sparsity: float = 0.2, *,
          score_cfg: ScoreConfig | None = None, merge_cfg: MergeConfig = MergeConfig(),
          groups: Sequence[str] = ("mlp",), select_cfg: SelectConfig = SelectConfig(), max_length: int = 512,
          generic_texts: Sequence[str] | None = None, progress: bool = True, recover: str = "none",
          refit_damping: float = 0.3):
    """Prune ``model`` in place for ``tasks`` ({task name: calibration texts}); returns (model, Mask).

    ``merge_cfg.method`` picks DIET's majority vote (default) or a baseline (``diet.registry.MERGE_METHODS``); the
    methods that read the generic text's scores or moments (``task_agnostic``, ``wanda_sp``, ``flap``) need
    ``generic_texts``, and so do ``recover="bias"``, ``"refit"`` and ``"refit_bias"`` for every
    method that does not rank with the tasks (``diet.merge.means_source``). The refit (``diet.refit``) fits on
    every text given, each task weighted by ``merge_cfg.weights``.
    """
    from diet.config import REFITS
    from diet.merge import magnitude_scores, means_source, moment_baseline_scores, recovery_means
    from diet.registry import MERGE_METHODS
    from diet.scorefile import split_scores

    prune_cfg = PruneConfig(sparsity=sparsity, groups=tuple(groups), recover=recover, refit_damping=refit_damping)
    for cfg in (prune_cfg, merge_cfg, select_cfg):
        cfg.validate()  # before any scoring
    score_cfg = score_cfg or ScoreConfig(groups=tuple(groups))
    if not tasks:
        raise ConfigError("no tasks to prune for", "pass {task name: [calibration texts]}")
    task_scores, task_moments = {}, {}
    for name, texts in tasks.items():
        log.info("scoring %s on %d texts", name, len(texts))
        tensors, _ = score(model, tokenizer, texts, score_cfg, max_length=max_length, progress=progress)
        task_scores[name], task_moments[name] = split_scores(tensors)
    method = merge_cfg.method
    inputs = MERGE_METHODS.facts(method).inputs
    generic = generic_moments = magnitude = baseline = None
    if recover in REFITS:
        from diet.config import check_refit_groups

        check_refit_groups(groups)
    needs_generic = recover in ("bias", *REFITS) and means_source(method) == "generic"
    if "generic" in inputs or "moments" in inputs or needs_generic:
        if not generic_texts:
            raise ConfigError(f"merge.method {method} (with prune.recover {recover}) needs generic_texts",
                              "pass generic_texts=[...]")
        tensors, _ = score(model, tokenizer, generic_texts, score_cfg, max_length=max_length, progress=progress)
        generic, generic_moments = split_scores(tensors)
    if "magnitude" in inputs:
        magnitude = magnitude_scores(model, groups=groups)
    if "moments" in inputs:
        baseline = moment_baseline_scores(method, model, generic_moments, groups=groups)
    _, mask = plan(task_scores, geometry(model, score_cfg.groups), merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                   select_cfg=select_cfg, generic=generic, magnitude=magnitude, baseline=baseline)
    means = None
    if recover == "bias":
        means = recovery_means(method, groups, task_moments=task_moments, generic_moments=generic_moments,
                               weights=merge_cfg.weights)
    if recover in REFITS:
        from diet.pruning import apply_mask
        from diet.refit import refit_on_texts

        sources = dict(tasks) if means_source(method) == "tasks" else {"generic": list(generic_texts)}
        done, _ = refit_on_texts(model, tokenizer, sources, mask.keep_tensors(),
                                 weights=merge_cfg.weights if "generic" not in sources else None,
                                 max_length=max_length, batch_size=score_cfg.batch_size, damping=refit_damping,
                                 bias=recover == "refit_bias", progress=progress)
        return apply_mask(model, done.keep, select_cfg.layout), mask
    return apply(model, mask, select_cfg.layout, means=means), mask
