"""Per-layer normalisations of scores (``merge.normalize``), found by name in ``diet.registry.NORMALIZATIONS``.

Each takes finite float64 scores (L, W) and returns a new float64 (L, W); ``diet.merge.normalize`` checks the
input and dispatches.
"""

from __future__ import annotations

import torch


def none(x: torch.Tensor) -> torch.Tensor:
    """The scores as they are (a copy)."""
    return x.clone()


def mean(x: torch.Tensor) -> torch.Tensor:
    """Divided by the layer mean; a layer whose mean is 0 becomes 0."""
    mu = x.mean(dim=1, keepdim=True)                                           # (L, 1)
    return torch.where(mu != 0, x / torch.where(mu != 0, mu, 1.0), torch.zeros_like(x))


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Minus the layer mean, over the layer's (population) standard deviation; a constant layer becomes 0."""
    mu = x.mean(dim=1, keepdim=True)                                           # (L, 1)
    sd = x.std(dim=1, correction=0, keepdim=True)                              # (L, 1)
    return torch.where(sd > 0, (x - mu) / torch.where(sd > 0, sd, 1.0), torch.zeros_like(x))


def rank(x: torch.Tensor) -> torch.Tensor:
    """Each layer mapped to [0, 1] by ordinal rank (ties: the lower index ranks lower)."""
    ranks = torch.argsort(torch.argsort(x, dim=1, stable=True), dim=1, stable=True).to(torch.float64)  # (L, W)
    return ranks / max(x.shape[1] - 1, 1)
