"""Pruning primitives that keep module metadata, the config and the checkpoint format true.

``keep`` everywhere is ``{group: [LongTensor of kept indices, one per layer]}`` with the groups of
``diet.groups.GROUPS``; a group left out of ``keep`` is not pruned. For ``attention`` the indices are
KV groups (see ``diet.groups``); for ``hidden`` it is one list of kept residual channels (one mask row for all
layers). Keep sets are checked and applied by ``diet.keep`` (each group's slices: ``diet.groups``), the
config is updated by ``diet.modeling.write_config``; this module composes them.

Recovery (``prune.recover: bias``, ``fold_means``): ``means`` is ``{group: (L, D)}``, the calibration mean of
every input channel of each layer's output projection (down_proj: ``D = I``; o_proj: ``D = n_heads *
head_dim``). Removing the channels ``R`` of a projection ``y = W x + b`` then keeps their mean contribution::

    y = W[:, K] x[K] + (b + W[:, R] mean[R])

so the pruned model equals the dense model whose removed channels are held at their means, not at zero.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diet.adapters import get_adapter
from diet.errors import ModelError
from diet.biases import add_output_bias
from diet.groups import GROUPS
from diet.keep import check_keep, slice_model, widths_after
from diet.modeling import stock_config_problem, write_config
from diet.registry import LAYOUTS

__all__ = ["apply_mask", "fold_means", "zero_mask"]


def apply_mask(model: nn.Module, keep: dict[str, list[torch.Tensor]], layout: str = "global",
               means: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Physically remove every dimension not in ``keep`` and update the config; returns ``model`` (pruned in place).

    With ``means`` (module doc) the removed channels' mean contribution is folded into the output projections'
    biases first (``fold_means``); every check runs before the model is touched.

    ``layout`` names an entry of ``diet.registry.LAYOUTS``; a uniform one (``layout="uniform"``) demands the same
    kept width in every layer and a config that stock transformers accepts; it is checked before anything is
    removed. With ``layout="global"`` widths may differ per layer
    and the model becomes the per-layer-width ``diet_<family>`` type (unless the widths happen to be uniform,
    in which case it stays a stock model). An output bias that the family's stock config cannot express makes
    it the per-layer type whatever the widths (``diet.adapters.base``).
    """
    if layout not in LAYOUTS:
        raise ModelError(f"unknown layout {layout!r}", f"use one of: {', '.join(LAYOUTS)}")
    adapter = get_adapter(model)
    keep = check_keep(adapter, keep)
    if LAYOUTS[layout].uniform:
        widths = widths_after(adapter, keep)
        uneven = {k: sorted(set(v)) for k, v in widths.items() if len(set(v)) > 1}
        if uneven:
            raise ModelError(f"layout 'uniform' needs the same width in every layer, the mask gives {uneven}",
                             "select the mask with select.layout: uniform, or prune with layout: global")
        problem = stock_config_problem(model.config, widths)
        if problem:
            raise ModelError(f"the uniformly pruned config is not one stock transformers accepts: {problem}",
                             "keep a number of attention groups whose head count divides hidden_size (with the "
                             "hidden group: a select.multiple for hidden that the kept head count divides), "
                             "prune only the mlp group, or use layout: global")
    if means is not None:
        fold_means(model, keep, means)
    slice_model(adapter, keep)
    write_config(model)
    return model


@torch.no_grad()
def fold_means(model: nn.Module, keep: dict[str, list[torch.Tensor]], means: dict[str, torch.Tensor]) -> None:
    """Add ``W[:, R] @ means[group][layer][R]`` to each output projection's bias, ``R`` the channels of the
    dimensions ``keep`` drops (module doc). The dense weights are read, nothing is removed: call it before
    pruning. All shapes are checked before any bias changes."""
    adapter = get_adapter(model)
    keep = check_keep(adapter, keep)
    refused = [g for g in keep if not GROUPS[g].recoverable]
    if refused:
        raise ModelError(f"recovery cannot hold removed {', '.join(refused)} dimensions at their means (no output "
                         "projection takes the residual stream as its input)",
                         "prune without means (prune.recover: none), or leave the group out")
    missing = [g for g in keep if g not in means]
    if missing:
        raise ModelError(f"recovery needs the calibration means of every pruned group; {', '.join(missing)} has "
                         "none", "score the group (score.groups) and pass its means")
    plan = []
    for group, per_layer in keep.items():
        mean = torch.as_tensor(means[group])                                     # (L, D)
        widths = [GROUPS[group].output_projection(adapter, i).in_features for i in range(adapter.num_layers)]
        if mean.dim() != 2 or mean.shape[0] != len(widths) or any(mean.shape[1] != w for w in widths):
            raise ModelError(f"the {group} means have shape {tuple(mean.shape)}, the model's output projections "
                             f"take {widths} channels per layer", "use means scored on this (dense) model")
        if not torch.isfinite(mean).all():
            raise ModelError(f"the {group} means contain NaN or infinite values", "rescore on a finite model")
        for layer, kept in enumerate(per_layer):
            dims = _removed(kept, GROUPS[group].widths(adapter)[layer])
            plan.append((group, layer, GROUPS[group].output_channels(adapter, layer, dims), mean[layer]))
    for group, layer, channels, mean in plan:
        w = GROUPS[group].output_projection(adapter, layer).weight                     # (H, D)
        cols = channels.to(w.device)
        delta = w[:, cols].double() @ mean.to(device=w.device, dtype=torch.float64)[cols]  # (H,)
        add_output_bias(adapter, group, layer, delta)


@torch.no_grad()
def zero_mask(model: nn.Module, keep: dict[str, list[torch.Tensor]]) -> nn.Module:
    """A dense copy of ``model`` whose removed dimensions contribute nothing: the reference for pruning.

    ``mlp``: the down_proj columns of removed channels are zeroed. ``attention``: the o_proj columns of every
    query head of a removed KV group are zeroed. ``hidden``: the embedding's columns and the o_proj / down_proj
    rows of removed residual channels are zeroed, so the residual stream is zero there in every layer
    (``DimensionGroup.zero``). Logits of ``apply_mask(model, keep)`` equal this copy's.
    """
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    keep = check_keep(adapter, keep)
    for group, per_layer in keep.items():
        widths = GROUPS[group].widths(adapter)
        for row, kept in enumerate(per_layer):
            GROUPS[group].zero(adapter, row, _removed(kept, widths[row]))
    return dense


def _removed(kept: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()  # (width - len(kept),)
