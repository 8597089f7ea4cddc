"""The built-in merge methods: one ``order`` function each, found by name in ``diet.registry.MERGE_METHODS``.

A method's ``order(m)`` gets one group's ``diet.merge.MergeInput`` and returns its sort keys: a tensor (L, W),
or a tuple of them, most significant first; a higher key is kept first, and ``diet.merge.merge`` breaks the
remaining ties by lowest (layer, index). The methods that read ``moments`` also name a ``channels`` function
(``diet.merge.moment_baseline_scores`` calls it per layer; docs/method.md has the formulas).
"""

from __future__ import annotations

import torch

#: FLAP standardises its metric per layer before ranking globally: part of the method, not a choice
FLAP_NORMALIZE = "zscore"


def vote(m):
    """DIET: weighted votes of the tasks' keep sets, then the weighted mean normalised score."""
    return torch.round(m.votes, decimals=9), m.mean_score


def mean(m):
    """The weighted mean normalised score."""
    return m.mean_score


def rank(m):
    """The weighted mean of the tasks' global ranks (lower first), then the mean normalised score."""
    mean_rank = sum(w * m.global_rank(t) for t, w in m.weights.items()) / sum(m.weights.values())  # (L, W)
    return -mean_rank, m.mean_score


def task_agnostic(m):
    """The generic text's scores, as the only task."""
    return m.normalized("generic")


def magnitude(m):
    """The L2 norm of the weights each dimension owns (``diet.merge.magnitude_scores``)."""
    return m.normalized("magnitude")


def random(m):
    """Uniform, from a generator seeded by ``merge.seed`` and the group."""
    return torch.rand(m.shape, generator=m.generator(), dtype=torch.float64)                  # (L, W)


def wanda_sp(m):
    """Wanda-sp's channel scores (``wanda_sp_channels``), normalised as ``merge.normalize`` says."""
    return m.normalized("moments")


def flap(m):
    """FLAP's fluctuation metric (``flap_channels``), always standardised per layer."""
    return m.normalized("moments", how=FLAP_NORMALIZE)


def wanda_sp_channels(readers, mean, var):
    """``sum_i |W[i, c]| * rms(a_c)``, ``rms(a_c) = sqrt(var_c + mean_c^2)``: readers each (out, D), mean and
    var (D,) float64 -> (D,)."""
    abs_sum = sum(w.abs().sum(dim=0) for w in readers)                                       # (D,)
    return abs_sum * (var + mean.square()).sqrt()                                            # (D,)


def flap_channels(readers, mean, var):
    """``var_c * sum_i W[i, c]^2``: readers each (out, D), var (D,) float64 -> (D,)."""
    return var * sum(w.square().sum(dim=0) for w in readers)                                 # (D,)
