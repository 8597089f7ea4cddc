"""Slicing primitives, and the ``Slice``: one projection's share of a dimension group, declared as data.

A dimension group (``diet.groups``) says, per layer, which rows or columns of which projections each of its
dimensions owns: a list of ``Slice(linear, axis, block)``. Dimension ``d`` owns the ``block`` contiguous rows
(``axis="out"``) or columns (``axis="in"``) ``[d * block, (d + 1) * block)`` of ``linear``. From that list alone
follow what the group costs (``Slice.cost``), how it is cut (``Slice.keep``), how its removed dimensions are
silenced in the dense reference (``Slice.zero``) and how large each dimension's weights are
(``Slice.squared_norms``). A row slice takes the row's bias entry with it; a column slice leaves the bias.

The primitives below (``slice_linear``, ``ensure_bias``, ``scale_linear``, ``slice_norm``) keep each module's
``in_features`` / ``out_features`` true and replace parameters whole, so that hooks and references to the
modules stay valid. Every float computation that rescales a weight runs in float64 and rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Axis = Literal["out", "in"]


def slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: str) -> nn.Linear:
    """Keep only the output rows (``dim="out"``) or input columns (``dim="in"``) ``idx`` of ``linear``, in place.

    ``in_features`` / ``out_features`` follow the new weight; an output slice also slices the bias.
    Returns ``linear`` (the same module, so hooks and references stay valid).
    """
    w = linear.weight  # (out, in)
    idx = idx.to(device=w.device, dtype=torch.long)
    if dim == "out":
        linear.weight = nn.Parameter(w.detach().index_select(0, idx), requires_grad=w.requires_grad)  # (k, in)
        if linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.detach().index_select(0, idx), requires_grad=b.requires_grad)  # (k,)
        linear.out_features = idx.numel()
    elif dim == "in":
        linear.weight = nn.Parameter(w.detach().index_select(1, idx), requires_grad=w.requires_grad)  # (out, k)
        linear.in_features = idx.numel()
    else:
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    return linear


def ensure_bias(lin: nn.Linear) -> None:
    """Give ``lin`` a zero bias (out_features,) on its weight's device and dtype if it has none."""
    if lin.bias is None:
        w = lin.weight
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)


def scale_linear(lin: nn.Linear, factor: float) -> None:
    """Multiply ``lin``'s weight and bias by ``factor`` (in float64, then back to their dtype), in place."""
    lin.weight = nn.Parameter((lin.weight.detach().double() * factor).to(lin.weight.dtype),
                              requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter((lin.bias.detach().double() * factor).to(lin.bias.dtype),
                                requires_grad=lin.bias.requires_grad)


def slice_norm(norm: nn.Module, kept: torch.Tensor, factor: float = 1.0, offset: float = 0.0) -> None:
    """Keep entries ``kept`` of an RMSNorm's weight and multiply the norm's gain by ``factor``: the gain is
    ``offset + weight`` (Llama: offset 0; Gemma: ``1 + weight``), so ``weight' = (offset + weight) * factor -
    offset``, computed in float64."""
    w = norm.weight
    kept_w = w.detach().index_select(0, kept.to(device=w.device, dtype=torch.long)).double()  # (k,)
    if factor != 1.0:
        kept_w = (offset + kept_w) * factor - offset
    norm.weight = nn.Parameter(kept_w.to(w.dtype), requires_grad=w.requires_grad)


def squared(lin: nn.Linear, axis: Axis) -> torch.Tensor:
    """Squared L2 norm of each output row (``"out"``: (out,)) or input column (``"in"``: (in,)), float32."""
    return lin.weight.detach().float().square().sum(dim=1 if axis == "out" else 0)


def row_cost(lin: nn.Linear) -> int:
    """Parameters of one output row of ``lin``: its weights and its bias entry."""
    return lin.in_features + (1 if lin.bias is not None else 0)


@dataclass(frozen=True)
class Slice:
    """The ``block`` contiguous rows (``axis="out"``) or columns (``axis="in"``) of ``linear`` that each dimension
    of a group owns (module doc)."""

    linear: nn.Linear
    axis: Axis
    block: int = 1

    def indices(self, dims: torch.Tensor) -> torch.Tensor:
        """The rows or columns of ``linear`` that dimensions ``dims`` own, in order (LongTensor)."""
        dims = dims.to(torch.long)
        if self.block == 1:
            return dims
        return (dims[:, None] * self.block + torch.arange(self.block)).flatten()  # (len(dims) * block,)

    def cost(self) -> int:
        """Parameters one dimension owns in ``linear``: its rows with their bias entries, or its columns."""
        return self.block * (row_cost(self.linear) if self.axis == "out" else self.linear.out_features)

    def keep(self, kept: torch.Tensor) -> None:
        """Cut ``linear`` down to the rows or columns of the dimensions ``kept``."""
        slice_linear(self.linear, self.indices(kept), self.axis)

    @torch.no_grad()
    def zero(self, removed: torch.Tensor) -> None:
        """Zero the weights (and, for rows, the bias entries) of the dimensions ``removed``, keeping every shape."""
        w = self.linear.weight
        idx = self.indices(removed).to(w.device)
        if self.axis == "in":
            w[:, idx] = 0.0                                                # (out, removed)
            return
        w[idx] = 0.0                                                       # (removed, in)
        if self.linear.bias is not None:
            self.linear.bias[idx.to(self.linear.bias.device)] = 0.0

    def add_squared_norms(self, total: torch.Tensor) -> torch.Tensor:
        """``total`` (one float32 entry per dimension) plus the squared L2 norm of each dimension's weights here,
        then of its bias entries: added in that order, so a group's sum is the same bytes however it is split."""
        width = total.numel()
        total = total + _per_dim(squared(self.linear, self.axis), width)  # (width,)
        if self.axis == "out" and self.linear.bias is not None:
            total = total + _per_dim(self.linear.bias.detach().float().square(), width)
        return total

    def residual_entries(self) -> int:
        """Weights of one dimension here that lie on one residual channel: one per owned row or column."""
        return self.block


def _per_dim(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sum contiguous blocks of ``values`` into ``width`` entries (a no-op for blocks of one)."""
    return values if values.numel() == width else values.view(width, -1).sum(dim=1)
