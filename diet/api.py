"""The DIET path as plain Python: score tasks, merge, select, prune. The DVC stages call these same functions.

    import diet
    pruned, mask = diet.prune(model, tokenizer, {"arc_easy": texts_a, "boolq": texts_b}, sparsity=0.2)

Each step is also available on its own (``score``, ``plan``, ``apply``) so a stage can cache its result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diet.config import MergeConfig, PruneConfig, ScoreConfig, SelectConfig
from diet.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """What the budget arithmetic needs to know of a dense model."""

    widths: dict[str, list[int]]   # group -> dimensions per layer
    costs: dict[str, list[int]]    # group -> parameters per dimension, per layer
    decoder_params: int            # parameters of all decoder layers (the base of sparsity)


def geometry(model, groups: Sequence[str] = ("mlp", "attention")) -> Geometry:
    from diet.adapters import get_adapter

    adapter = get_adapter(model)
    return Geometry(widths={g: adapter.group_widths(g) for g in groups},
                    costs={g: [adapter.dimension_cost(g, i) for i in range(adapter.num_layers)] for g in groups},
                    decoder_params=adapter.decoder_param_count())


def geometry_from_folder(model_dir: str | Path, groups: Sequence[str] = ("mlp", "attention")) -> Geometry:
    """Geometry from a model folder's config alone (the model is built on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return geometry(model, groups)


def score(model, tokenizer, texts: Sequence[str], cfg: ScoreConfig = ScoreConfig(), *, max_length: int = 512,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-dimension importance of ``cfg.groups`` on ``texts``: (tensors, stats).

    ``tensors`` holds ``{group: (L, W) float32}`` and the per-channel moments ``{group}.mean`` / ``{group}.var``
    (L, D); ``diet.scoring.split_scores`` separates them.
    """
    from diet.adapters import get_adapter
    from diet.scoring import score_texts
    from diet.tokens import resolve_add_bos

    adapter = get_adapter(model)
    return score_texts(model, tokenizer, list(texts), groups=cfg.groups, statistic=cfg.statistic,
                       weight_norm=cfg.weight_norm, batch_size=cfg.batch_size, max_length=max_length,
                       add_bos=resolve_add_bos(model, tokenizer), progress=progress, adapter=adapter)


def plan(task_scores: Mapping[str, Mapping[str, torch.Tensor]], geo: Geometry, *,
         merge_cfg: MergeConfig = MergeConfig(), prune_cfg: PruneConfig = PruneConfig(),
         select_cfg: SelectConfig = SelectConfig(), generic: Mapping[str, torch.Tensor] | None = None,
         magnitude: Mapping[str, torch.Tensor] | None = None, baseline: Mapping[str, torch.Tensor] | None = None):
    """Merge per-task scores into one order per group and select the mask: (merged, Mask)."""
    from diet.select import select

    merged = merge_scores(task_scores, geo, merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                          generic=generic, magnitude=magnitude, baseline=baseline)
    mask = select({g: m["priority"] for g, m in merged.items()}, geo.widths, geo.costs,
                  sparsity=prune_cfg.sparsity, decoder_params=geo.decoder_params, min_keep=select_cfg.min_keep,
                  multiple=select_cfg.multiple, layout=select_cfg.layout)
    return merged, mask


def merge_scores(task_scores, geo: Geometry, *, merge_cfg: MergeConfig, prune_cfg: PruneConfig,
                 generic=None, magnitude=None, baseline=None) -> dict[str, dict[str, torch.Tensor]]:
    from diet.merge import keep_count, merge

    missing = [g for g in prune_cfg.groups if g not in geo.widths]
    if missing:
        raise ConfigError(f"prune.groups {missing} were not measured", "add them to score.groups and rescore")
    budget = keep_count(geo.widths, geo.costs, prune_cfg.sparsity, geo.decoder_params, prune_cfg.groups)
    return merge(task_scores, method=merge_cfg.method, normalize=merge_cfg.normalize, weights=merge_cfg.weights,
                 budget=budget, seed=merge_cfg.seed, magnitude=magnitude, generic=generic, baseline=baseline)


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
          generic_texts: Sequence[str] | None = None, progress: bool = True, recover: str = "none"):
    """Prune ``model`` in place for ``tasks`` ({task name: calibration texts}); returns (model, Mask).

    ``merge_cfg.method`` picks DIET's majority vote (default) or a baseline; ``task_agnostic``, ``wanda_sp``
    and ``flap`` need ``generic_texts``, and so does ``recover="bias"`` for every method that does not rank
    with the tasks (``diet.merge.means_source``).
    """
    from diet.merge import MOMENT_METHODS, magnitude_scores, means_source, moment_baseline_scores, recovery_means
    from diet.scoring import split_scores

    prune_cfg = PruneConfig(sparsity=sparsity, groups=tuple(groups), recover=recover)
    prune_cfg.validate()
    score_cfg = score_cfg or ScoreConfig(groups=tuple(groups))
    if not tasks:
        raise ConfigError("no tasks to prune for", "pass {task name: [calibration texts]}")
    task_scores, task_moments = {}, {}
    for name, texts in tasks.items():
        log.info("scoring %s on %d texts", name, len(texts))
        tensors, _ = score(model, tokenizer, texts, score_cfg, max_length=max_length, progress=progress)
        task_scores[name], task_moments[name] = split_scores(tensors)
    method = merge_cfg.method
    generic = generic_moments = magnitude = baseline = None
    if method in ("task_agnostic", *MOMENT_METHODS) or (recover == "bias" and means_source(method) == "generic"):
        if not generic_texts:
            raise ConfigError(f"merge.method {method} (with prune.recover {recover}) needs generic_texts",
                              "pass generic_texts=[...]")
        tensors, _ = score(model, tokenizer, generic_texts, score_cfg, max_length=max_length, progress=progress)
        generic, generic_moments = split_scores(tensors)
    if method == "magnitude":
        magnitude = magnitude_scores(model, groups=groups)
    if method in MOMENT_METHODS:
        baseline = moment_baseline_scores(method, model, generic_moments, groups=groups)
    _, mask = plan(task_scores, geometry(model, score_cfg.groups), merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                   select_cfg=select_cfg, generic=generic, magnitude=magnitude, baseline=baseline)
    means = None
    if recover == "bias":
        means = recovery_means(method, groups, task_moments=task_moments, generic_moments=generic_moments,
                               weights=merge_cfg.weights)
    return apply(model, mask, select_cfg.layout, means=means), mask


def recovery_means_from_files(method: str, groups: Sequence[str], *, task_files: Mapping[str, str | Path],
                              generic_file: str | Path | None, weights: Mapping[str, float] | None = None,
                              expect_fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    """``diet.merge.recovery_means`` from score files: ``task_files`` ({task: path}) for the task methods,
    ``generic_file`` for the others (only the files the method's rule needs are read; each is refused if it
    was scored on another model or carries no moments)."""
    from diet.merge import means_source, recovery_means
    from diet.scoring import read_moments

    if means_source(method) == "tasks":
        active = {t: p for t, p in task_files.items() if float((weights or {}).get(t, 1.0)) > 0}
        task_moments = {t: read_moments(p, expect_fingerprint, groups) for t, p in active.items()}
        return recovery_means(method, groups, task_moments=task_moments, weights=weights)
    if generic_file is None:
        raise ConfigError(f"prune.recover: bias with merge.method {method} needs the generic score file",
                          "pass --generic baselines/generic.safetensors")
    return recovery_means(method, groups, generic_moments=read_moments(generic_file, expect_fingerprint, groups))
