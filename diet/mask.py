"""The mask: the kept dimensions of every layer of every pruned group, its parameter accounting, and its file.

``select`` writes it (``masks/mask.json``: a human-readable ``summary`` and the data ``Mask.from_json`` reads
back); ``prune`` reads it, checked when read (``Mask.load``) and against the model it is applied to
(``check_fits``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diet.config import GROUPS as GROUP_NAMES
from diet.errors import DataError
from diet.registry import LAYOUTS


@dataclass
class Mask:
    """The kept dimensions of every layer of every pruned group, and the parameter accounting."""

    keep: dict[str, list[list[int]]]          # group -> layer -> sorted kept indices
    base_widths: dict[str, list[int]]          # group -> width per layer before pruning
    params_before: int                          # decoder-layer parameters before
    params_after: int
    target_sparsity: float
    layout: str = "global"
    multiple: int | dict[str, int] = 1          # one for every group, or per group (select.multiple)
    min_keep: float | dict[str, float] = 0.0    # one for every group, or per group (select.min_keep)
    widths: dict[str, list[int]] = field(init=False)  # group -> kept width per layer

    def __post_init__(self):
        self.widths = {g: [len(k) for k in layers] for g, layers in self.keep.items()}
        for g, layers in self.keep.items():
            if len(layers) != len(self.base_widths[g]):
                raise ValueError(f"group '{g}': {len(layers)} layers kept, {len(self.base_widths[g])} in the model")
            for i, (kept, w) in enumerate(zip(layers, self.base_widths[g])):
                if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= w:
                    raise ValueError(f"group '{g}' layer {i}: kept indices must be sorted, unique, "
                                     f"non-empty and inside [0, {w})")

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def sparsity(self) -> float:
        """Achieved share of decoder-layer parameters removed."""
        return self.removed / self.params_before

    def keep_tensors(self) -> dict[str, list[torch.Tensor]]:
        """``{group: [LongTensor of kept indices per layer]}``, the form ``diet.pruning.apply_mask`` takes."""
        return {g: [torch.tensor(k, dtype=torch.long) for k in layers] for g, layers in self.keep.items()}

    def summary(self) -> dict:
        groups = {}
        for g, widths in self.widths.items():
            total = sum(self.base_widths[g])
            groups[g] = {"kept_dims": sum(widths), "total_dims": total, "kept_share": round(sum(widths) / total, 6),
                         "width_min": min(widths), "width_max": max(widths),
                         "widths": " ".join(str(w) for w in widths)}
        return {"target_sparsity": self.target_sparsity, "achieved_sparsity": round(self.sparsity, 6),
                "decoder_params_before": self.params_before, "decoder_params_after": self.params_after,
                "removed_params": self.removed, "layout": self.layout, "multiple": self.multiple,
                "min_keep": self.min_keep, "groups": groups}

    def to_json(self) -> dict:
        """A JSON-ready dict: a human-readable ``summary`` and the data ``from_json`` reads back."""
        return {"summary": self.summary(), "keep": self.keep, "base_widths": self.base_widths,
                "params_before": self.params_before, "params_after": self.params_after,
                "target_sparsity": self.target_sparsity, "layout": self.layout, "multiple": self.multiple,
                "min_keep": self.min_keep}

    @classmethod
    def from_json(cls, data: Mapping) -> "Mask":
        return cls(keep={g: [list(map(int, k)) for k in layers] for g, layers in data["keep"].items()},
                   base_widths={g: list(map(int, w)) for g, w in data["base_widths"].items()},
                   params_before=int(data["params_before"]), params_after=int(data["params_after"]),
                   target_sparsity=float(data["target_sparsity"]), layout=data.get("layout", "global"),
                   multiple=_per_group_value(data.get("multiple", 1), int),
                   min_keep=_per_group_value(data.get("min_keep", 0.0), float))

    def save(self, path) -> None:
        from diet.io import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Mask":
        """Read a mask file written by ``save``, checked when read (DataError naming the file and the fix)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"mask file not found: {path}", "select the mask", artifact="mask")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _mask_error(path, f"not valid JSON (truncated or another format?): {e}") from None
        _check_mask_json(path, data)
        try:
            return cls.from_json(data)
        except (ValueError, TypeError, KeyError) as e:
            raise _mask_error(path, str(e)) from None


def _per_group_value(value, cast):
    """A constraint read from a mask file: one value, or ``{group: value}``."""
    return {str(g): cast(v) for g, v in value.items()} if isinstance(value, Mapping) else cast(value)


_MASK_KEYS = ("keep", "base_widths", "params_before", "params_after", "target_sparsity")


def _mask_error(path, problem: str) -> DataError:
    return DataError(f"mask {path}: {problem}", "select the mask again", artifact="mask")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_mask_json(path, data) -> None:
    """Everything ``Mask.from_json`` relies on, with the group and layer of the first problem."""
    if not isinstance(data, dict):
        raise _mask_error(path, f"holds a JSON {type(data).__name__}, not an object")
    missing = [k for k in _MASK_KEYS if k not in data]
    if missing:
        raise _mask_error(path, f"lacks {', '.join(missing)}")
    keep, base = data["keep"], data["base_widths"]
    if not isinstance(keep, dict) or not isinstance(base, dict) or not keep:
        raise _mask_error(path, "'keep' and 'base_widths' must be non-empty objects {group: per-layer lists}")
    if data.get("layout", "global") not in LAYOUTS:
        raise _mask_error(path, f"layout {data.get('layout')!r} is not one of {', '.join(LAYOUTS)}")
    before, after = data["params_before"], data["params_after"]
    if not _is_int(before) or not _is_int(after) or not 0 < after <= before:
        raise _mask_error(path, f"params_before {before!r} and params_after {after!r} must be integers with "
                          "0 < params_after <= params_before")
    summary = data["summary"].get("groups") if isinstance(data.get("summary"), dict) else None
    summary = summary if isinstance(summary, dict) else {}  # the human-readable part; checked where present
    for g, layers in keep.items():
        if g not in GROUP_NAMES:
            raise _mask_error(path, f"unknown group '{g}' (known: {', '.join(GROUP_NAMES)})")
        widths = base.get(g)
        if not isinstance(widths, list) or not all(_is_int(w) and w > 0 for w in widths):
            raise _mask_error(path, f"group '{g}' has no list of positive base widths")
        if not isinstance(layers, list) or len(layers) != len(widths):
            raise _mask_error(path, f"group '{g}' keeps {len(layers) if isinstance(layers, list) else '?'} layers, "
                              f"its base_widths list {len(widths)}")
        for i, (kept, w) in enumerate(zip(layers, widths)):
            where = f"group '{g}' layer {i}"
            if not isinstance(kept, list) or not kept:
                raise _mask_error(path, f"{where} keeps nothing (an empty layer)")
            if not all(_is_int(k) for k in kept):
                raise _mask_error(path, f"{where}: kept indices must be integers")
            if len(set(kept)) != len(kept):
                raise _mask_error(path, f"{where} lists an index twice")
            if min(kept) < 0 or max(kept) >= w:
                raise _mask_error(path, f"{where} has indices outside [0, {w})")
            if kept != sorted(kept):
                raise _mask_error(path, f"{where}: kept indices are not sorted")
        stated = summary.get(g, {}).get("widths") if isinstance(summary.get(g), dict) else None
        if stated is not None and str(stated).split() != [str(len(k)) for k in layers]:
            raise _mask_error(path, f"group '{g}': the summary's widths {stated!r} do not match the keep lists "
                              f"({' '.join(str(len(k)) for k in layers)})")


def check_fits(mask: Mask, widths: Mapping[str, Sequence[int]], mask_path, model_path) -> None:
    """Refuse a mask selected for other layer widths than the model it is applied to (``widths`` by group)."""
    for g, base in mask.base_widths.items():
        have = list(widths.get(g, []))
        if have != list(base):
            raise DataError(f"mask {mask_path} was selected for {g} widths {base}, but {model_path} has {have}",
                            "select a mask for this model", artifact="mask")
