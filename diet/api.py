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
    from transformers import AutoModelForCausalLM

    from diet.modeling import read_config

    config = read_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return geometry(model, groups)


def score(model, tokenizer, texts: Sequence[str], cfg: ScoreConfig = ScoreConfig(), *, max_length: int = 512,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-dimension importance of ``cfg.groups`` on ``texts``: ({group: (L, W) float32}, stats)."""
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
         magnitude: Mapping[str, torch.Tensor] | None = None):
    """Merge per-task scores into one order per group and select the mask: (merged, Mask)."""
    from diet.select import select

    merged = merge_scores(task_scores, geo, merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                          generic=generic, magnitude=magnitude)
    mask = select({g: m["priority"] for g, m in merged.items()}, geo.widths, geo.costs,
                  sparsity=prune_cfg.sparsity, decoder_params=geo.decoder_params, min_keep=select_cfg.min_keep,
                  multiple=select_cfg.multiple, layout=select_cfg.layout)
    return merged, mask


def merge_scores(task_scores, geo: Geometry, *, merge_cfg: MergeConfig, prune_cfg: PruneConfig,
                 generic=None, magnitude=None) -> dict[str, dict[str, torch.Tensor]]:
    from diet.merge import keep_count, merge

    missing = [g for g in prune_cfg.groups if g not in geo.widths]
    if missing:
        raise ConfigError(f"prune.groups {missing} were not measured", "add them to score.groups and rescore")
    budget = keep_count(geo.widths, geo.costs, prune_cfg.sparsity, geo.decoder_params, prune_cfg.groups)
    return merge(task_scores, method=merge_cfg.method, normalize=merge_cfg.normalize, weights=merge_cfg.weights,
                 budget=budget, seed=merge_cfg.seed, magnitude=magnitude, generic=generic)


def apply(model, mask, layout: str | None = None):
    """Physically remove what ``mask`` drops; returns the (same, now smaller) model."""
    from diet.pruning import apply_mask

    return apply_mask(model, mask.keep_tensors(), layout or mask.layout)


def prune(model, tokenizer, tasks: Mapping[str, Sequence[str]], sparsity: float = 0.2, *,
          score_cfg: ScoreConfig | None = None, merge_cfg: MergeConfig = MergeConfig(),
          groups: Sequence[str] = ("mlp",), select_cfg: SelectConfig = SelectConfig(), max_length: int = 512,
          generic_texts: Sequence[str] | None = None, progress: bool = True):
    """Prune ``model`` in place for ``tasks`` ({task name: calibration texts}); returns (model, Mask).

    ``merge_cfg.method`` picks DIET's majority vote (default) or a baseline; ``task_agnostic`` needs
    ``generic_texts``.
    """
    prune_cfg = PruneConfig(sparsity=sparsity, groups=tuple(groups))
    prune_cfg.validate()
    score_cfg = score_cfg or ScoreConfig(groups=tuple(groups))
    if not tasks:
        raise ConfigError("no tasks to prune for", "pass {task name: [calibration texts]}")
    task_scores = {}
    for name, texts in tasks.items():
        log.info("scoring %s on %d texts", name, len(texts))
        task_scores[name], _ = score(model, tokenizer, texts, score_cfg, max_length=max_length, progress=progress)
    generic = magnitude = None
    if merge_cfg.method == "task_agnostic":
        if not generic_texts:
            raise ConfigError("merge.method task_agnostic needs generic_texts", "pass generic_texts=[...]")
        generic, _ = score(model, tokenizer, generic_texts, score_cfg, max_length=max_length, progress=progress)
    if merge_cfg.method == "magnitude":
        from diet.merge import magnitude_scores

        magnitude = magnitude_scores(model, groups=groups)
    _, mask = plan(task_scores, geometry(model, score_cfg.groups), merge_cfg=merge_cfg, prune_cfg=prune_cfg,
                   select_cfg=select_cfg, generic=generic, magnitude=magnitude)
    return apply(model, mask, select_cfg.layout), mask
