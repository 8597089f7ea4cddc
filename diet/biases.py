"""Output biases: the bias of a group's output projection (down_proj, o_proj), which recovery gives a value.

``prune.recover: bias`` and ``refit_bias`` add to it (``add_output_bias``). Where the family's stock config has a
flag that gives the group's projections a bias (``ModelAdapter.BIAS_FLAGS``; Llama's ``mlp_bias`` and
``attention_bias`` give *all* the group's projections one), ``carry_output_biases`` sets the flag and gives the
group's other projections zero biases, so the checkpoint stays stock. Where it has none, the model becomes the
per-layer ``diet_<family>`` type, whose config lists the groups in ``output_biases`` (``diet.modeling``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from diet.groups import GROUPS
from diet.slicing import ensure_bias

if TYPE_CHECKING:
    from diet.adapters.base import ModelAdapter


def add_output_bias(adapter: ModelAdapter, group: str, layer: int, delta: torch.Tensor) -> None:
    """Add ``delta`` (H,) to the bias of ``group``'s output projection in ``layer`` (created at zero if absent),
    summing in float64."""
    lin = GROUPS[group].output_projection(adapter, layer)
    ensure_bias(lin)
    new = lin.bias.detach().double() + delta.to(device=lin.bias.device, dtype=torch.float64)  # (H,)
    lin.bias = nn.Parameter(new.to(lin.weight.dtype), requires_grad=lin.bias.requires_grad)


def output_bias_groups(adapter: ModelAdapter) -> list[str]:
    """Groups (of those with an output projection per layer) whose output projection carries a bias in any
    layer."""
    return [name for name, g in GROUPS.items() if g.recoverable
            and any(g.output_projection(adapter, i).bias is not None for i in range(adapter.num_layers))]


def ensure_output_biases(adapter: ModelAdapter, groups: Sequence[str]) -> None:
    """Give the output projection of every layer of ``groups`` a (zero) bias where it has none."""
    for group in groups:
        for layer in range(adapter.num_layers):
            ensure_bias(GROUPS[group].output_projection(adapter, layer))


def carry_output_biases(adapter: ModelAdapter) -> list[str]:
    """Make the config describe the output biases; returns the groups no stock flag can carry (module doc)."""
    unflagged = []
    for group in output_bias_groups(adapter):
        flag = adapter.BIAS_FLAGS.get(group)
        if flag is None:
            unflagged.append(group)
            continue
        setattr(adapter.config, flag, True)
        for layer in range(adapter.num_layers):
            for lin in GROUPS[group].projections(adapter, layer):
                ensure_bias(lin)
    ensure_output_biases(adapter, unflagged)
    return unflagged
