"""How ``select`` turns one group's priorities into per-layer kept widths (``select.layout``), found by name in
``diet.registry.LAYOUTS``.

Each ``pick(prio, widths, costs, floors, multiple, target)`` gets the group's priorities (L, W) (higher = keep
first), each layer's width, parameters per dimension and least kept width, the ``multiple`` kept widths round to,
and the parameters to remove; it returns the kept width of each layer.
"""

from __future__ import annotations

import heapq

import torch


def _next_width(width: int, current: int, floor: int, multiple: int) -> int | None:
    """The largest allowed width below ``current``, or None at the floor."""
    nxt = (current - 1) // multiple * multiple
    return nxt if nxt >= floor and current > floor else None


def _removal_order(prio: torch.Tensor) -> list[int]:
    """Indices of one layer's dimensions, least important first (priority asc; ties: higher index first)."""
    keep_first = torch.sort(prio, descending=True, stable=True).indices  # priority desc, index asc
    return keep_first.flip(0).tolist()


def select_global(prio: torch.Tensor, widths: list[int], costs: list[int], floors: list[int], multiple: int,
                  target: float) -> list[int]:
    """Per-layer kept widths: greedy removal of the lowest-mean-priority block while it nears the target."""
    current = list(widths)
    orders = [_removal_order(prio[i, : w]) for i, w in enumerate(widths)]

    def push(heap, i):
        nxt = _next_width(widths[i], current[i], floors[i], multiple)
        if nxt is not None:
            block = orders[i][widths[i] - current[i]: widths[i] - nxt]       # dims this block removes
            mean_prio = float(prio[i, block].double().mean())
            heapq.heappush(heap, (mean_prio, i, current[i] - nxt))

    heap: list = []
    for i in range(len(widths)):
        push(heap, i)
    removed = 0.0
    while heap and removed < target:
        _, i, size = heapq.heappop(heap)
        cost = size * costs[i]
        if target - removed > cost / 2:  # removing this block brings the total closer to the target
            current[i] -= size
            removed += cost
            push(heap, i)
        # else: this layer's later blocks need this one removed first, so the layer is done
    return current


def select_uniform(prio: torch.Tensor, widths: list[int], costs: list[int], floors: list[int], multiple: int,
                   target: float) -> list[int]:
    """One kept width for all layers: the allowed width whose removed parameters are closest to the target."""
    hi, lo = min(widths), max(floors)
    candidates = sorted({hi} | set(range(-(-lo // multiple) * multiple, hi + 1, multiple)), reverse=True)

    def removed(k):
        return sum((w - k) * c for w, c in zip(widths, costs))

    best = min(candidates, key=lambda k: (abs(removed(k) - target), -k))  # ties: keep more
    return [best] * len(widths)
