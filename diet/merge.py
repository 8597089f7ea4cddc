"""Per-task scores in, one global order of dimensions out (pure tensors, no files).

Pipeline for one group, each score tensor (L, W) (layers x dimensions):

1. ``normalize`` each task's scores per layer, so that dimensions of different layers compare.
2. Each task keeps its global top-``k`` dimensions across all layers (``task_keep_mask``), where ``k`` is
   the number of dimensions the sparsity budget keeps (``keep_count``).
3. ``merge`` turns the tasks into one order with the method that ``diet.registry.MERGE_METHODS`` names: its
   ``order`` function (``diet.merge_methods``) gets the group's ``MergeInput`` and returns sort keys. For
   ``vote`` (DIET) the order is, most important first::

       votes desc  ->  mean normalised score desc  ->  layer asc  ->  index asc

   where votes = sum of the weights of the tasks that keep the dimension, and the mean is weighted by the
   task weights. The order is written as one float per dimension, ``priority`` (higher = keep first,
   ``N`` for the first of ``N`` dimensions down to ``1`` for the last), so it has no float ties.

The sparsity budget (how many dimensions each group keeps) is ``diet.budget``'s.

The field's baselines (``wanda_sp``, ``flap``) score dimensions from the per-channel activation moments of the
generic text (``diet.scoring``: ``mean`` and ``var`` per input channel of down_proj / o_proj) and the weights
of that output projection ``W`` (H, D); ``moment_baseline_scores`` computes them (docs/method.md):

* ``wanda_sp``: channel ``c`` scores ``sum_i |W[i, c]| * rms(a_c)``, ``rms(a_c) = sqrt(var_c + mean_c^2)``
  (the L2 norm over tokens divided by sqrt(tokens), a constant factor);
* ``flap``: channel ``c`` scores ``var_c * sum_i W[i, c]^2`` (FLAP's fluctuation metric), always
  standardised per layer (``diet.merge_methods.FLAP_NORMALIZE``) whatever ``merge.normalize`` says.

Each formula is the method's ``channels`` function (``diet.merge_methods``), named by its registry entry.

A dimension that owns a block of channels (an ``attention`` KV group: the o_proj columns of its query heads;
``DimensionGroup.channel_blocks``) sums the scores of its channels.

Recovery (``prune.recover: bias``) folds the mean of the removed channels into the output projection's bias;
``recovery_means`` picks the means of the data the method ranked with (``means_source``).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diet.config import MergeConfig, PruneConfig
from diet.errors import ConfigError, DataError
from diet.budget import keep_count
from diet.groups import get_group
from diet.registry import MERGE_METHODS, NORMALIZATIONS, load

#: the built-in methods whose order depends on the tasks (``MergeMethod.uses_tasks``)
TASK_METHODS = MERGE_METHODS.names(lambda f: f.uses_tasks)


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Per-layer normalisation of scores (L, W) by a name of ``diet.registry.NORMALIZATIONS`` (float64 out).

    ``none``; ``mean`` divides by the layer mean; ``zscore`` subtracts the layer mean and divides by the layer
    standard deviation (population); a constant layer becomes 0. ``rank`` maps each layer to [0, 1] by ordinal
    rank (ties: lower index ranks lower). The functions: ``diet.normalizations``.
    """
    fn = NORMALIZATIONS.get(how)
    x = scores.detach().to(torch.float64)                                      # (L, W)
    if x.dim() != 2:
        raise ValueError(f"scores must be (layers, dimensions), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("scores contain NaN or infinite values", "rescore the task; check the model's dtype")
    return fn(x)


_normalize = normalize  # ``merge`` takes a parameter of the same name


def _descending_order(*keys: torch.Tensor) -> torch.Tensor:
    """Flat indices ordered by ``keys[0]`` desc, then ``keys[1]`` desc, ..., then flat index asc."""
    order = torch.arange(keys[0].numel())                                      # (N,)
    for key in reversed(keys):  # least significant key first; each stable sort keeps the previous order
        flat = key.reshape(-1)[order]
        order = order[torch.sort(flat, descending=True, stable=True).indices]
    return order


def task_keep_mask(norm_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Global top-``k`` of normalised scores (L, W) across layers, ties to the lowest (layer, index): bool (L, W)."""
    n = norm_scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"keep count {k} outside [0, {n}]")
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_descending_order(norm_scores)[:k]] = True
    return keep.view(norm_scores.shape)                                        # (L, W)


def _global_rank(norm_scores: torch.Tensor) -> torch.Tensor:
    """Position of each dimension in the task's global order (0 = most important), (L, W) float64."""
    rank = torch.empty(norm_scores.numel(), dtype=torch.float64)
    rank[_descending_order(norm_scores)] = torch.arange(norm_scores.numel(), dtype=torch.float64)
    return rank.view(norm_scores.shape)


def _priority(order: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Order (N,) most important first -> priority (L, W): N for the first, 1 for the last."""
    n = order.numel()
    pri = torch.empty(n, dtype=torch.float32)
    pri[order] = torch.arange(n, 0, -1, dtype=torch.float32)
    return pri.view(shape)


def layer_agreement(keeps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise Jaccard similarity of the tasks' keep sets (each bool (L, W)) within each layer: (L,).

    1.0 with a single task; two empty keep sets of a layer count as identical.
    """
    if not keeps:
        raise ValueError("no keep sets")
    n_layers = keeps[0].shape[0]
    if len(keeps) == 1:
        return torch.ones(n_layers, dtype=torch.float32)
    total = torch.zeros(n_layers, dtype=torch.float64)
    pairs = list(itertools.combinations(keeps, 2))
    for a, b in pairs:
        inter = (a & b).sum(dim=1).double()                                    # (L,)
        union = (a | b).sum(dim=1).double()                                    # (L,)
        total += torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return (total / len(pairs)).float()


# -- merge -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeInput:
    """What a merge method's ``order`` sees of one group (shapes (L, W) = layers x dimensions).

    ``weights`` and ``scores`` cover the tasks with a positive weight, in name order (the weights as given,
    the scores normalised per layer as ``merge.normalize`` says, float64); ``votes`` (float64) sums the weights of
    the tasks whose global top-k keeps each dimension; ``mean_score`` is the weighted mean of ``scores`` (None
    without such a task). ``sources`` holds the other inputs a method can read (``diet.registry.INPUTS``):
    ``{"generic" | "magnitude" | "moments": {group: (L, W)} or None}``.
    """

    method: str
    group: str
    shape: torch.Size
    normalize: str
    seed: int
    weights: Mapping[str, float]
    scores: Mapping[str, torch.Tensor]
    votes: torch.Tensor
    mean_score: torch.Tensor | None
    sources: Mapping[str, Mapping[str, torch.Tensor] | None]

    def normalized(self, source: str, how: str | None = None) -> torch.Tensor:
        """The group's scores of ``source`` normalised per layer (``how``, default ``merge.normalize``): (L, W)."""
        label = self.method if source == "moments" else source
        return _normalized(self.sources[source], self.group, self.shape, how or self.normalize, label)

    def global_rank(self, task: str) -> torch.Tensor:
        """Position of each dimension in ``task``'s global order (0 = most important): (L, W) float64."""
        return _global_rank(self.scores[task])

    def generator(self) -> torch.Generator:
        """A generator seeded by ``merge.seed`` and the group (not by which other groups are merged)."""
        return torch.Generator().manual_seed(_group_seed(self.seed, self.group))


def merge(task_scores: Mapping[str, Mapping[str, torch.Tensor]], *, method: str, normalize: str,
          weights: Mapping[str, float] | None, budget: Mapping[str, int], seed: int = 0,
          magnitude: Mapping[str, torch.Tensor] | None = None, generic: Mapping[str, torch.Tensor] | None = None,
          baseline: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """One global order per group of ``budget`` (``{group: dims kept by a task's top-k}``).

    Returns ``{group: {"priority": (L, W) float32, "votes": (L, W) float32, "agreement": (L,) float32}}``.

    ``method`` names an entry of ``diet.registry.MERGE_METHODS``; its ``order`` function ranks each group
    (``diet.merge_methods``: ``vote``, ``mean``, ``rank``, ``task_agnostic`` on the ``generic`` scores,
    ``magnitude`` on the ``magnitude`` scores, ``random`` seeded by ``seed`` and group, ``wanda_sp`` / ``flap``
    on the ``baseline`` scores from ``moment_baseline_scores``).

    Every method breaks remaining ties by lowest (layer, index). ``votes`` and ``agreement`` describe the
    keep sets of the tasks with a positive weight, for every method (zeros / NaN when there are none).
    """
    how = normalize  # the parameter shadows the function; the function is reached as ``_normalize``
    facts = MERGE_METHODS.facts(method)
    tasks = sorted(task_scores)
    w = {t: float((weights or {}).get(t, 1.0)) for t in tasks}  # checked where read (diet.config.check_weights)
    active = [t for t in tasks if w[t] > 0]
    sources = {"generic": generic, "magnitude": magnitude, "moments": baseline}
    _check_inputs(method, facts.inputs, active, sources)
    order_keys = MERGE_METHODS.get(method)

    out = {}
    for group in budget:
        shape = _group_shape(group, tasks, task_scores, generic, magnitude, baseline)
        norm = {t: _normalized(task_scores[t], group, shape, how, t) for t in tasks}  # each (L, W)
        keeps = {t: task_keep_mask(norm[t], int(budget[group])) for t in active}        # each (L, W) bool
        votes = torch.zeros(shape, dtype=torch.float64)
        for t in active:
            votes += w[t] * keeps[t].double()                                            # (L, W)
        wsum = sum(w[t] for t in active)
        mean_score = sum(w[t] * norm[t] for t in active) / wsum if active else None      # (L, W)

        inputs = MergeInput(method=method, group=group, shape=shape, normalize=how, seed=seed,
                            weights={t: w[t] for t in active}, scores={t: norm[t] for t in active},
                            votes=votes, mean_score=mean_score, sources=sources)
        keys = order_keys(inputs)
        keys = tuple(keys) if isinstance(keys, (tuple, list)) else (keys,)
        if not keys or any(not isinstance(k, torch.Tensor) or k.shape != shape for k in keys):
            got = [tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__ for k in keys]
            raise ValueError(f"merge method {method!r} returned sort keys {got}, expected tensors {tuple(shape)}")
        order = _descending_order(*keys)
        agreement = (layer_agreement([keeps[t] for t in active]) if active
                     else torch.full((shape[0],), float("nan")))
        out[group] = {"priority": _priority(order, shape), "votes": votes.float(), "agreement": agreement}
    return out


def _check_inputs(method: str, inputs: Sequence[str], active: Sequence[str], sources: Mapping) -> None:
    """A ConfigError when ``method`` reads an input that was not given (or tasks, and none has a weight)."""
    if "tasks" in inputs and not active:
        raise ConfigError(f"merge.method {method} needs at least one task with a positive weight",
                          "list tasks under 'tasks' and give at least one a weight above 0")
    if "generic" in inputs and sources["generic"] is None:
        raise ConfigError(f"merge.method {method} needs scores on generic text", "score the generic corpus first")
    if "magnitude" in inputs and sources["magnitude"] is None:
        raise ConfigError(f"merge.method {method} needs weight-magnitude scores", "pass magnitude_scores(...)")
    if "moments" in inputs and sources["moments"] is None:
        raise ConfigError(f"merge.method {method} needs its scores from the generic text's moments",
                          f"pass moment_baseline_scores({method!r}, ...)")


def _normalized(scores: Mapping[str, torch.Tensor], group: str, shape: torch.Size, how: str,
                source: str) -> torch.Tensor:
    """``scores[group]`` normalised per layer, after checking it exists and has ``shape``."""
    if group not in scores:
        raise DataError(f"the {source} scores have no group '{group}'",
                        f"add '{group}' to score.groups and rescore")
    if tuple(scores[group].shape) != tuple(shape):
        raise DataError(f"the {source} scores for '{group}' have shape {tuple(scores[group].shape)}, "
                        f"expected {tuple(shape)}", "rescore every task on the same model")
    return _normalize(scores[group], how)


def _group_shape(group, tasks, task_scores, generic, magnitude, baseline) -> torch.Size:
    for source in [*(task_scores[t] for t in tasks), generic, magnitude, baseline]:
        if source is not None and group in source:
            return source[group].shape
    raise DataError(f"no scores for group '{group}'", f"add '{group}' to score.groups and rescore")


def _group_seed(seed: int, group: str) -> int:
    """A seed per (seed, group): a group's random order does not depend on which other groups are merged."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "little") >> 1


# -- weight magnitude --------------------------------------------------------------------------------------------
def magnitude_scores(model, adapter=None, groups: Sequence[str] = ("mlp",)) -> dict[str, torch.Tensor]:
    """L2 norm of all weights (and biases) each dimension owns: {group: (L, W) float32}."""
    if adapter is None:
        from diet.adapters import get_adapter

        adapter = get_adapter(model)

    out = {}
    for group in groups:
        rule = get_group(group)
        rows = [rule.magnitude(adapter, row).cpu() for row in range(len(rule.widths(adapter)))]  # each (W,)
        if len({r.numel() for r in rows}) != 1:
            raise DataError(f"group '{group}' has different widths per layer", "use the base (unpruned) model")
        out[group] = torch.stack(rows)                                                  # (L, W)
    return out


# -- the field's baselines from activation moments ---------------------------------------------------------------
def moment_methods() -> tuple[str, ...]:
    """The registered methods that read ``moments`` (``wanda_sp``, ``flap``)."""
    return MERGE_METHODS.names(lambda f: "moments" in f.inputs)


def moment_baseline_scores(method: str, model, moments: Mapping[str, Mapping[str, torch.Tensor]],
                           groups: Sequence[str] = ("mlp",), adapter=None) -> dict[str, torch.Tensor]:
    """Scores of a method that reads ``moments`` (``wanda_sp``, ``flap``: module doc) from per-channel ``moments``
    ``{group: {"mean", "var"}}`` (each (L, D), of the generic text) and the model's output projections, by the
    method's ``channels`` function (its registry entry): ``{group: (L, W) float32}``."""
    channels_target = MERGE_METHODS.facts(method).channels
    if channels_target is None:
        raise ValueError(f"{method!r} is not one of {moment_methods()}")
    channels = load(channels_target)
    if adapter is None:
        from diet.adapters import get_adapter

        adapter = get_adapter(model)
    out = {}
    for group in groups:
        if group not in moments:
            raise DataError(f"the generic scores have no moments for group '{group}'",
                            f"add '{group}' to score.groups and score the generic text again",
                            artifact="generic_scores")
        mean = moments[group]["mean"].double()                                          # (L, D)
        var = moments[group]["var"].double()                                            # (L, D)
        rows = []
        rule = get_group(group)
        n_rows = len(rule.widths(adapter))
        if mean.shape[0] != n_rows:
            raise DataError(f"the generic moments of '{group}' have {mean.shape[0]} rows, the model's group has "
                            f"{n_rows}", "rescore the generic text on this model")
        for layer in range(n_rows):
            readers = [w.detach().double().cpu() for w in rule.reader_weights(adapter, layer)]  # each (out, D)
            width = readers[0].shape[1]
            if tuple(mean[layer].shape) != (width,):
                raise DataError(f"the generic moments of '{group}' have {mean.shape[1]} channels, the model's "
                                f"layer {layer} has {width}", "rescore the generic text on this model")
            channel = channels(readers, mean[layer], var[layer])                          # (D,)
            blocks = rule.channel_blocks(adapter, layer)  # a dimension sums its block of channels
            rows.append(channel if blocks is None else channel.view(blocks, -1).sum(dim=1))  # (W,)
        if len({r.numel() for r in rows}) != 1:
            raise DataError(f"group '{group}' has different widths per layer", "use the base (unpruned) model")
        out[group] = torch.stack(rows).float()                                          # (L, W)
    return out


# -- recovery ------------------------------------------------------------------------------------------------------
def means_source(method: str) -> str:
    """``"tasks"`` for the methods that rank with the tasks' calibration data, ``"generic"`` for the others.

    The baselines that use no data (``magnitude``, ``random``) take the generic text's means, as
    ``task_agnostic``, ``wanda_sp`` and ``flap`` do: none of them may see the tasks.
    """
    return "tasks" if MERGE_METHODS.facts(method).uses_tasks else "generic"


def recovery_means(method: str, groups: Sequence[str], *,
                   task_moments: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
                   generic_moments: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                   weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Per-channel means ``{group: (L, D) float32}`` whose removed channels ``prune.recover: bias`` folds.

    ``task_moments`` is ``{task: {group: {"mean": (L, D), ...}}}``. For the task methods the mean is the
    merge-weighted mean of the tasks' means (tasks of weight 0 left out; default weights 1: the plain
    average, each task counts the same whatever its token count); for the others, the generic text's mean.
    """
    source = means_source(method)
    out = {}
    for group in groups:
        if source == "generic":
            if generic_moments is None or group not in generic_moments:
                raise DataError(f"recovery for merge.method {method} needs the generic text's means of '{group}'",
                                "pass the generic score file (baselines/generic.safetensors)")
            out[group] = generic_moments[group]["mean"].float()
            continue
        w = {t: float((weights or {}).get(t, 1.0)) for t in sorted(task_moments or {})}
        active = [t for t in w if w[t] > 0]
        if not active:
            raise DataError(f"recovery for merge.method {method} needs the means of at least one task with a "
                            "positive weight", "list the tasks' score files and give one a weight above 0")
        lacking = [t for t in active if group not in task_moments[t]]
        if lacking:
            raise DataError(f"the score files of {', '.join(lacking)} have no moments of '{group}'",
                            f"add '{group}' to score.groups and rescore")
        total = sum(w[t] * task_moments[t][group]["mean"].double() for t in active)     # (L, D)
        out[group] = (total / sum(w[t] for t in active)).float()
    return out


def merge_scores(task_scores, geo, *, merge_cfg: MergeConfig, prune_cfg: PruneConfig,
                 generic=None, magnitude=None, baseline=None) -> dict[str, dict[str, torch.Tensor]]:
    """``merge`` with the budget that ``prune_cfg`` asks of a model of geometry ``geo`` (a
    ``diet.geometry.Geometry``)."""
    missing = [g for g in prune_cfg.groups if g not in geo.widths]
    if missing:
        raise ConfigError(f"prune.groups {missing} were not measured: the scores hold {', '.join(geo.widths)}",
                          "add them to score.groups and score every task again", artifact="task_scores")
    budget = keep_count(geo.widths, geo.costs, prune_cfg.sparsity, geo.decoder_params, prune_cfg.groups,
                        geo.crossings)
    return merge(task_scores, method=merge_cfg.method, normalize=merge_cfg.normalize, weights=merge_cfg.weights,
                 budget=budget, seed=merge_cfg.seed, magnitude=magnitude, generic=generic, baseline=baseline)


def recovery_means_from_files(method: str, groups: Sequence[str], *, task_files: Mapping[str, str | Path],
                              generic_file: str | Path | None, weights: Mapping[str, float] | None = None,
                              expect_fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    """``diet.merge.recovery_means`` from score files: ``task_files`` ({task: path}) for the task methods,
    ``generic_file`` for the others (only the files the method's rule needs are read; each is refused if it
    was scored on another model or carries no moments)."""
    from diet.scorefile import read_moments

    if means_source(method) == "tasks":
        active = {t: p for t, p in task_files.items() if float((weights or {}).get(t, 1.0)) > 0}
        task_moments = {t: read_moments(p, expect_fingerprint, groups, expect_task=t) for t, p in active.items()}
        return recovery_means(method, groups, task_moments=task_moments, weights=weights)
    if generic_file is None:
        raise ConfigError(f"prune.recover: bias with merge.method {method} needs the generic score file",
                          "pass --generic baselines/generic.safetensors")
    return recovery_means(method, groups, generic_moments=read_moments(generic_file, expect_fingerprint, groups,
                                                                       expect_task="generic"))
