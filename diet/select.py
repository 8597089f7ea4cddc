"""From a global priority per dimension to the kept dimensions of every layer, under a parameter budget.

Per group, the parameters to remove come from ``diet.budget.removal_targets`` (the same fraction of every
pruned group's parameters). Constraints on each layer's kept width ``k``:

* ``k >= floor``, ``floor = min(W, roundup(max(1, ceil(min_keep * W)), multiple))``: a layer is never
  emptied and keeps at least ``min_keep`` of its dimensions;
* ``k`` is a multiple of ``multiple``, or ``W`` (an untouched layer).

``layout: global`` removes, greedily, the block of dimensions with the lowest mean priority among all
layers' next removable blocks (``multiple`` dimensions each; a layer's first block takes it from ``W`` to
the largest allowed width below), as long as that brings the removed parameters closer to the target.
With ``multiple: 1`` this removes dimensions in ascending priority and ends within half a dimension's
cost of the target. ``layout: uniform`` picks the one allowed width for all layers whose removed
parameters are closest to the target, then keeps each layer's highest-priority dimensions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diet.config import check_min_keep, check_multiple, check_per_group, per_group
from diet.errors import ConfigError, DataError
from diet.groups import GROUPS
from diet.mask import Mask
from diet.budget import Crossings, prunable_params, removal_targets, removed_params, shared_params
from diet.registry import LAYOUTS


def floor_width(width: int, min_keep: float, multiple: int) -> int:
    """Least kept width of a layer: ceil(min_keep * width), at least 1, rounded up to ``multiple``, <= width."""
    least = max(1, math.ceil(round(min_keep * width, 9)))  # round: 0.05 * 20 is 1.0000000000000002
    return min(width, -(-least // multiple) * multiple)


def select(priority: Mapping[str, torch.Tensor], widths: Mapping[str, Sequence[int]],
           costs: Mapping[str, Sequence[int]], *, sparsity: float, decoder_params: int,
           min_keep: float | Mapping[str, float], multiple: int | Mapping[str, int], layout: str,
           crossings: Crossings | None = None) -> Mask:
    """Kept dimensions per layer for every group in ``priority`` ({group: (L, W), higher = keep first}).

    ``min_keep`` and ``multiple`` are one value for every group or a mapping ``{group: value}`` naming every
    group of ``priority`` (``diet.config.SelectConfig``). ``crossings`` (``diet.geometry.Geometry``) lists the
    parameters two groups share: the budget and the mask's parameter counts take each of them once.
    """
    groups = list(priority)
    keeps, multiples = _resolve(min_keep, multiple, groups)
    for g in groups:
        if g not in widths or g not in costs:
            raise ValueError(f"group '{g}' has a priority but no widths or costs")
        if tuple(priority[g].shape) != (len(widths[g]), max(widths[g])):
            raise ValueError(f"priority of '{g}' is {tuple(priority[g].shape)}, widths are {list(widths[g])}")
    floors = _floors(widths, groups, keeps, multiples)
    _check_reachable(groups, widths, costs, floors, sparsity, decoder_params, layout, multiples, crossings)
    targets = removal_targets(widths, costs, sparsity, decoder_params, groups, crossings)

    keep, dropped = {}, {}
    pick = LAYOUTS.get(layout)
    for g in groups:
        kept_widths = pick(priority[g], list(widths[g]), list(costs[g]), floors[g], multiples[g], targets[g])
        keep[g] = [_top_indices(priority[g][i, : widths[g][i]], k) for i, k in enumerate(kept_widths)]
        dropped[g] = [w - k for w, k in zip(widths[g], kept_widths)]
    removed = removed_params(dropped, costs, crossings)
    scalar = not isinstance(min_keep, Mapping) and not isinstance(multiple, Mapping)
    return Mask(keep=keep, base_widths={g: list(map(int, widths[g])) for g in groups},
                params_before=int(decoder_params), params_after=int(decoder_params - removed),
                target_sparsity=float(sparsity), layout=layout,
                multiple=multiple if scalar else multiples, min_keep=float(min_keep) if scalar else keeps)


def _resolve(min_keep, multiple, groups: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-group ``min_keep`` and ``multiple`` from scalars or mappings, each checked (ConfigError)."""
    check_per_group("select.min_keep", min_keep, check_min_keep)
    check_per_group("select.multiple", multiple, check_multiple)
    out = []
    for key, value in (("min_keep", min_keep), ("multiple", multiple)):
        missing = [g for g in groups if per_group(value, g) is None]
        if missing:
            raise ConfigError(f"select.{key} gives values per group but none for {', '.join(missing)}",
                              f"add {', '.join(f'{g}: <value>' for g in missing)} to select.{key}")
        out.append({g: per_group(value, g) for g in groups})
    keeps, multiples = out
    return {g: float(v) for g, v in keeps.items()}, multiples


def check_constraints(widths: Mapping[str, Sequence[int]], groups: Sequence[str],
                      min_keep: float | Mapping[str, float], multiple: int | Mapping[str, int]) -> None:
    """Refuse, before any work, a pruned group that these constraints (or the model) leave nothing to remove.

    For each group of ``groups`` (``widths``: the dense model's dimensions per layer): a group the model cannot
    prune at all (``DimensionGroup.unprunable_reason``, e.g. attention with one KV head per layer), a
    ``multiple`` not smaller than the widest layer (the only width it allows is the whole layer), and a
    ``min_keep`` whose floor keeps every dimension. Each is a ConfigError naming the key and the fix. Needs the
    widths only (``diet.geometry.geometry_from_folder`` reads them from the config). The budget itself is
    checked by ``check_budget`` (and again by ``select``).
    """
    keeps, multiples = _resolve(min_keep, multiple, groups)
    for g in groups:
        w = list(widths[g])
        reason = GROUPS[g].unprunable_reason(w)
        if reason:
            rest = [o for o in groups if o != g]
            raise ConfigError(f"prune.groups includes {g!r}, but this model's {g} group cannot be pruned: {reason}",
                              f"set prune.groups to {rest}" if rest else
                              f"prune another group (prune.groups: [{', '.join(o for o in GROUPS if o != g)}])")
        key_multiple = "select.multiple" + (f".{g}" if isinstance(multiple, Mapping) else "")
        widest = max(w)
        if multiples[g] >= widest:  # the widths allowed are multiples of it, or the whole width
            per = {o: multiples[o] if o != g else 1 for o in groups}
            where = f"at most {widest} per layer" if len(w) > 1 else f"{widest}, one mask for every layer"
            raise ConfigError(f"{key_multiple} = {multiples[g]} is not smaller than the {g} group's width ({where}): "
                              f"no {g} dimension could be removed",
                              f"give {g} its own multiple, e.g. select.multiple: "
                              f"{{{', '.join(f'{o}: {v}' for o, v in per.items())}}}, or leave {g} out of "
                              "prune.groups")
        if all(floor_width(x, keeps[g], multiples[g]) >= x for x in w):
            key = "select.min_keep" + (f".{g}" if isinstance(min_keep, Mapping) else "")
            most = (widest - 1) // multiples[g] * multiples[g]  # the widest kept width below the whole layer
            bound = math.floor(most / widest * 1e4) / 1e4
            example = {**{o: keeps[o] for o in groups if o != g}, g: bound}
            raise ConfigError(f"{key} = {keeps[g]} keeps every {g} dimension (with select.multiple "
                              f"{multiples[g]}, the least kept width equals the width {widest}): nothing is left "
                              "to prune",
                              f"set {key} to at most {bound} (keeping {most} of {widest}), e.g. select.min_keep: "
                              f"{{{', '.join(f'{o}: {v}' for o, v in example.items())}}}, or leave {g} out of "
                              "prune.groups")


def _floors(widths: Mapping[str, Sequence[int]], groups: Sequence[str], keeps: Mapping[str, float],
            multiples: Mapping[str, int]) -> dict[str, list[int]]:
    """The least kept width of every layer of every group under ``min_keep`` and ``multiple``."""
    return {g: [floor_width(w, keeps[g], multiples[g]) for w in widths[g]] for g in groups}


def check_budget(geo, groups: Sequence[str], sparsity: float, min_keep: float | Mapping[str, float],
                 multiple: int | Mapping[str, int], layout: str) -> None:
    """Refuse a ``prune.sparsity`` that ``groups`` cannot reach under these constraints, from the model's
    geometry alone (``diet.geometry.Geometry``: widths and parameter costs from the config; no scores, no
    weights): the ConfigError ``select`` would raise, saying the largest reachable sparsity."""
    keeps, multiples = _resolve(min_keep, multiple, groups)
    _check_reachable(list(groups), geo.widths, geo.costs, _floors(geo.widths, groups, keeps, multiples), sparsity,
                     geo.decoder_params, layout, multiples, geo.crossings)


def _top_indices(prio: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-priority indices of one layer (W,), sorted ascending."""
    return sorted(torch.sort(prio, descending=True, stable=True).indices[:k].tolist())


def _check_reachable(groups, widths, costs, floors, sparsity, decoder_params, layout, multiples,
                     crossings=None) -> None:
    """Refuse a budget that would need cutting below the floors; say the largest reachable sparsity.

    Every group removes the same fraction of its parameters, so the group with the least room sets the limit
    (parameters two groups share go once: ``diet.merge.shared_params``).
    """
    most = {}  # group -> the most parameters it can remove
    for g in groups:
        floor_g = floors[g]
        if LAYOUTS.facts(layout).uniform:
            lo, hi = max(floors[g]), min(widths[g])
            if lo > hi:
                raise ConfigError(f"layout uniform cannot give group '{g}' one width: its layers' widths "
                                  f"{sorted(set(widths[g]))} and floors {sorted(set(floors[g]))} do not overlap",
                                  "use select.layout: global, or prune the base (unpruned) model")
            least = -(-lo // multiples[g]) * multiples[g]
            floor_g = [least if least <= hi else hi] * len(widths[g])
        most[g] = sum((w - f) * c for w, f, c in zip(widths[g], floor_g, costs[g]))
    prunable = {g: prunable_params(widths, costs, g) for g in groups}
    fraction = min(most[g] / prunable[g] for g in groups)
    reachable_params = fraction * sum(prunable.values()) - fraction ** 2 * shared_params(widths, crossings, groups)
    if float(sparsity) * decoder_params > reachable_params * (1 + 1e-9):
        reachable = reachable_params / decoder_params
        shown = next(iter(multiples.values())) if len(set(multiples.values())) == 1 else multiples
        problem = (f"prune.sparsity {sparsity} cannot be reached: with select.min_keep, select.multiple = "
                   f"{shown} and layout {layout}, at most {reachable:.4f} of the decoder parameters can be "
                   f"removed from the groups {list(groups)}")
        stuck = [g for g in groups if most[g] == 0]  # e.g. attention with one KV group per layer (Gemma-3-270M)
        if stuck:
            others = [g for g in groups if g not in stuck]
            raise ConfigError(f"{problem}: {', '.join(repr(g) for g in stuck)} has nothing to remove (every "
                              "layer already sits at its least kept width)",
                              _stuck_fix(stuck, others, groups, widths, multiples))
        raise ConfigError(problem, f"set prune.sparsity <= {math.floor(reachable * 1e4) / 1e4}, or lower "
                          "select.min_keep / select.multiple, or prune more groups")


def _stuck_fix(stuck, others, groups, widths, multiples) -> str:
    """The fix for groups with nothing to remove: leave them out where the model cannot lose any of their
    dimensions (``unprunable_reason``), else also loosen their own constraints."""
    if all(GROUPS[g].unprunable_reason(widths[g]) for g in stuck):
        return (f"set prune.groups to {others}" if others else
                f"prune another group than {', '.join(stuck)}, or lower select.min_keep / select.multiple")
    example = ", ".join(f"{g}: {1 if g in stuck else multiples[g]}" for g in groups)
    return ((f"set prune.groups to {others}, or " if others else "") +
            f"give {', '.join(stuck)} its own select.multiple / select.min_keep (e.g. multiple: {{{example}}}), "
            "or lower them")


def read_priority(path, groups: Sequence[str], widths: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``{group: (L, W) priority}`` from the merge stage's votes file, checked against the model's ``widths``."""
    from safetensors.torch import load_file

    path, fix = Path(path), {"fix": "merge the task scores again", "artifact": "merged"}
    if not path.is_file():
        raise DataError(f"merged priorities not found: {path}", "merge the task scores first", artifact="merged")
    try:
        merged = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise DataError(f"{path} is not a readable safetensors file (truncated, or another format): "
                        f"{type(e).__name__}: {e}", **fix) from None
    out = {}
    for g in groups:
        t = merged.get(f"{g}.priority")
        if t is None:
            have = ", ".join(sorted(merged)) or "nothing"
            raise DataError(f"{path} holds no priority for group '{g}' (it has {have})", **fix)
        shape = (len(widths[g]), max(widths[g]))
        if t.dim() != 2 or not t.dtype.is_floating_point or tuple(t.shape) != shape:
            raise DataError(f"{path}: the '{g}' priority is a {tuple(t.shape)} {t.dtype} tensor; the model needs "
                            f"a float {shape} one", **fix)
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{path}: the '{g}' priority contains NaN or infinite values", **fix)
        out[g] = t
    return out
