"""Damped least squares on a projection's calibration sums, and the channels to keep chosen by the error it
leaves (optimal brain surgeon): the linear algebra of the refit (``diet.refit``), on ``H = sum w A A^T`` and
``C = sum w y A^T`` only, no model (the refit passes them in float64).
"""

from __future__ import annotations

import torch

#: with ``obs``, the channels that may go: this many times the number removed, of lowest merged priority
POOL = 2


def damped_solve(hess: torch.Tensor, cross: torch.Tensor, channels: int, damping: float,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """``(cross + lambda start) (hess + lambda I)^-1``: least squares damped toward ``start`` (the dense columns;
    None: toward zero), lambda = ``damping`` times the mean of the channel entries' diagonal (the intercept is
    not damped)."""
    lam = damping * float(hess.diagonal()[:channels].mean())
    damped = hess.clone()
    damped.diagonal()[:channels] += lam
    target = cross.clone()
    if start is not None:
        target[:, :channels] += lam * start[:, :channels]
    try:
        return torch.linalg.solve(damped, target.T).T                                      # (out, K)
    except RuntimeError:  # singular (fewer tokens than channels, no damping): the least-squares solution
        return torch.linalg.lstsq(damped, target.T).solution.T


def obs_keep(hess: torch.Tensor, cross: torch.Tensor, n_keep: int, prior: torch.Tensor, damping: float,
             bias: bool) -> torch.Tensor:
    """The ``n_keep`` channels to keep (sorted LongTensor) of a projection whose Gram over all its ``D`` input
    channels (and, with ``bias``, the intercept last) is ``hess`` and whose cross term is ``cross``.

    Optimal brain surgeon, greedily: with ``Hi = (hess + lambda I)^-1`` and the full refit ``W = cross Hi``,
    removing channel ``j`` and refitting the rest adds ``||W[:, j]||^2 / Hi[j, j]`` to the calibration error;
    the cheapest channel goes, ``W`` and ``Hi`` are updated (rank one), and so on. Only the
    ``POOL * (D - n_keep)`` channels of lowest ``prior`` may go (the task-aware vote stays the prior; ties: the
    higher index first); the intercept never goes.
    """
    width = prior.numel()
    removed = width - n_keep
    if removed <= 0:
        return torch.arange(width)
    damped = hess.clone()
    damped.diagonal()[:width] += damping * float(hess.diagonal()[:width].mean())
    hi = torch.linalg.pinv(damped, hermitian=True)
    w = cross @ hi                                                                          # (out, K)
    # lowest priority first; ties: the higher index first, as the selection removes (diet.select)
    order = (width - 1 - torch.sort(prior.double().flip(0).cpu(), stable=True).indices)
    pool = torch.zeros(width, dtype=torch.bool, device=hess.device)
    pool[order[:min(width, POOL * removed)].to(hess.device)] = True
    alive = torch.ones(width, dtype=torch.bool, device=hess.device)
    for _ in range(removed):
        d = hi.diagonal()[:width].clamp_min(1e-300)
        cost = w[:, :width].square().sum(dim=0) / d                                         # (D,)
        cost[~(alive & pool)] = float("inf")
        j = int(torch.argmin(cost))
        w -= torch.outer(w[:, j], hi[j]) / hi[j, j]
        hi -= torch.outer(hi[:, j], hi[j]) / hi[j, j]
        alive[j] = False
    del bias  # the intercept sits past ``width`` and is never a candidate
    return alive.nonzero().flatten().cpu()
