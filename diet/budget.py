"""The sparsity budget: how many parameters each pruned group removes, and so how many dimensions it keeps.

``sparsity`` is the share of ALL decoder-layer parameters to remove, embeddings excluded (``diet.merge`` and
``diet.select`` ask this module). Only the pruned groups' parameters can go, and
with several groups each removes the same fraction ``f`` of its own prunable parameters::

    f = sparsity * decoder_params / sum_g prunable_g        target_g = f * prunable_g

so the targets add up to ``sparsity * decoder_params``. Groups that share parameters (``hidden`` with ``mlp`` or
``attention``: the weight ``gate[j, c]`` belongs to MLP channel ``j`` and to residual channel ``c``) count a
shared parameter in each group's own parameters but remove it once; with ``C`` the parameters two pruned groups
share, removing the fraction ``f`` of every group's dimensions removes ``f * P - f^2 * C`` (``P = sum_g
prunable_g``), and ``f`` is the root of ``f * P - f^2 * C = sparsity * decoder_params``
(``removal_fraction``). Each group's target stays ``f * prunable_g``, of its own parameters.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from diet.errors import ConfigError


def prunable_params(widths: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[int]], group: str) -> int:
    """Parameters held by ``group``'s dimensions: sum over layers of width * cost per dimension."""
    if len(widths[group]) != len(costs[group]):
        raise ValueError(f"group '{group}': {len(widths[group])} widths but {len(costs[group])} costs")
    return sum(int(w) * int(c) for w, c in zip(widths[group], costs[group]))


Crossings = Mapping[str, Mapping[str, Sequence[int]]]


def shared_params(widths: Mapping[str, Sequence[int]], crossings: Crossings | None, groups: Sequence[str]) -> int:
    """Parameters that two of ``groups`` both own, each counted once (``C`` in the module doc).

    ``crossings[g][o]`` lists, per row of ``o``, the parameters one dimension of ``g`` (a group with one mask row
    shared by every layer, ``hidden``) shares with one dimension of ``o``: every dimension of ``g`` crosses every
    dimension of ``o``.
    """
    total = 0
    for g, per_other in (crossings or {}).items():
        for o, shared in per_other.items():
            if g in groups and o in groups:
                total += sum(int(w) for w in widths[g]) * sum(int(w) * int(x) for w, x in zip(widths[o], shared))
    return total


def removed_params(removed: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[int]],
                   crossings: Crossings | None = None) -> int:
    """Decoder parameters that removing ``removed[g][row]`` dimensions of each group takes, a parameter owned by
    two removed dimensions counted once (inclusion-exclusion over ``crossings``, see ``shared_params``)."""
    total = sum(int(r) * int(c) for g in removed for r, c in zip(removed[g], costs[g]))
    for g, per_other in (crossings or {}).items():
        for o, shared in per_other.items():
            if g in removed and o in removed:
                total -= sum(int(r) for r in removed[g]) * sum(int(r) * int(x) for r, x in zip(removed[o], shared))
    return total


def removal_fraction(prunable: float, shared: float, target: float) -> float:
    """The fraction ``f`` of every group's parameters to remove so that ``f * prunable - f^2 * shared`` (a
    shared parameter goes when either of its dimensions goes) equals ``target``; the smaller root."""
    if shared <= 0:
        return target / prunable
    return 2 * target / (prunable + math.sqrt(max(prunable * prunable - 4 * shared * target, 0.0)))


def removal_targets(widths: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[int]], sparsity: float,
                    decoder_params: int, groups: Sequence[str], crossings: Crossings | None = None
                    ) -> dict[str, float]:
    """Parameters each group must remove (of its own, shared ones included) so that ``sparsity`` of the decoder
    parameters go (see module doc)."""
    if not groups:
        raise ConfigError("no group to prune", "set e.g. prune.groups: [mlp]")
    prunable = {g: prunable_params(widths, costs, g) for g in groups}
    shared = shared_params(widths, crossings, groups)
    total = sum(prunable.values()) - shared  # the groups' parameters, each counted once
    target = float(sparsity) * decoder_params
    if target > total:
        raise ConfigError(
            f"sparsity {sparsity} asks to remove {target:.0f} parameters, but the groups {list(groups)} "
            f"hold only {total} ({total / decoder_params:.1%} of the decoder parameters)",
            f"lower prune.sparsity below {total / decoder_params:.3f} or prune more groups")
    fraction = removal_fraction(sum(prunable.values()), shared, target)
    return {g: fraction * prunable[g] for g in groups}


def keep_count(widths: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[int]], sparsity: float,
               decoder_params: int, groups: Sequence[str], crossings: Crossings | None = None) -> dict[str, int]:
    """Dimensions of each group a task keeps in its global top-k: all minus the group's target / mean cost."""
    targets = removal_targets(widths, costs, sparsity, decoder_params, groups, crossings)
    out = {}
    for g in groups:
        n = sum(int(w) for w in widths[g])
        mean_cost = prunable_params(widths, costs, g) / n
        out[g] = min(n, max(0, n - round(targets[g] / mean_cost)))
    return out


# -- per-task rankings -------------------------------------------------------------------------------------------
