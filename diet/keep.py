"""Keep sets against a model: checked, applied to its weights, and the per-layer widths they give.

A keep set is ``{group: [LongTensor of kept indices, one per mask row]}`` over the groups of ``diet.groups``
(a group left out is not pruned). ``check_keep`` validates one against a model's adapter before anything is
touched; ``slice_model`` removes every dimension it drops from the weights (the config update is
``diet.modeling.write_config``); ``layer_widths`` / ``widths_after`` read the per-layer widths, keyed by the
config field each one sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from diet.errors import ModelError
from diet.groups import GROUPS

if TYPE_CHECKING:
    from diet.adapters.base import ModelAdapter


def check_keep(adapter: ModelAdapter, keep: dict[str, Sequence[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Validate a keep set against the adapter's model; returns it as sorted, unique LongTensors per row."""
    out: dict[str, list[torch.Tensor]] = {}
    for group, per_layer in keep.items():
        if group not in GROUPS:
            raise ModelError(f"unknown dimension group {group!r} in the mask", f"use: {', '.join(GROUPS)}")
        widths = GROUPS[group].widths(adapter)
        if len(per_layer) != len(widths):
            raise ModelError(f"the {group} mask has {len(per_layer)} layers, the model has {len(widths)}"
                             + (" (the group has one mask row for all layers)" if len(widths) == 1 else ""),
                             "build the mask from this model's scores")
        out[group] = [_check_row(group, layer, idx, width)
                      for layer, (idx, width) in enumerate(zip(per_layer, widths))]
    return out


def _check_row(group: str, layer: int, idx, width: int) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
    kept = torch.unique(idx)  # sorted
    where = f"{group} mask of layer {layer}"
    if kept.numel() == 0:
        raise ModelError(f"the {where} keeps nothing", "keep at least one dimension per layer (select.min_keep > 0)")
    if kept.numel() != idx.numel():
        raise ModelError(f"the {where} lists an index twice", "list each kept index once")
    if kept[0] < 0 or kept[-1] >= width:
        raise ModelError(f"the {where} has indices outside [0, {width})", "build the mask from this model's scores")
    return kept


def slice_model(adapter: ModelAdapter, keep: dict[str, list[torch.Tensor]]) -> None:
    """Remove the dimensions not in ``keep`` (already checked) from the weights only; the config is left alone.
    Also shapes freshly built per-layer-width models, possibly on the meta device."""
    for name, group in GROUPS.items():
        for layer, kept in enumerate(keep.get(name, [])):
            group.slice(adapter, layer, kept)
    adapter.sync_module_attributes()


def layer_widths(adapter: ModelAdapter) -> dict[str, list[int]]:
    """Per-layer widths read from the weights, keyed by the config field each one sets."""
    return {field: values for group in GROUPS.values() for field, values in group.config_widths(adapter).items()}


def widths_after(adapter: ModelAdapter, keep: dict[str, list[torch.Tensor]]) -> dict[str, list[int]]:
    """The per-layer widths that pruning to ``keep`` would give, without touching the model."""
    widths = layer_widths(adapter)
    for name, kept in keep.items():
        widths.update(GROUPS[name].config_widths(adapter, kept))
    return widths
