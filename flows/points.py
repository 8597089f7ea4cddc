"""Sweep points: a merge method at a sparsity, with its recovery, pruned groups and an ablation's setting, parsed
from the command line, named, and checked as the stages would check them (``flows.sweep`` runs them)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.repo import FlowError, merged_params, read_params

SWEPT = ("prune.sparsity", "merge.method", "prune.recover", "merge.weights", "prune.groups")
DEFAULT_SPARSITIES, DEFAULT_METHODS = (0.1, 0.2, 0.3), ("vote",)
#: the task-agnostic reference of every comparison
TASK_AGNOSTIC = "task_agnostic"


@dataclass(frozen=True)
class Point:
    """One experiment of a sweep: a merge method at a sparsity, optionally with a recovery, the dimension
    groups it prunes, and a task left out.

    ``recover`` None keeps params.yaml's ``prune.recover``; ``groups`` None keeps its ``prune.groups``;
    ``held_out`` names a task whose merge weight is set to 0 (left out of the calibration) and whose evaluation
    alone the experiment runs (leave-one-task-out); ``setting`` is other params the point changes, as
    ``((dotted key, YAML value), ...)`` (an ablation: ``(("score.statistic", "l2"),)``).
    """

    method: str
    sparsity: float
    recover: str | None = None
    held_out: str | None = None
    groups: tuple[str, ...] | None = None
    setting: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``vote``, ``vote+bias``, ``vote [mlp+hidden]``, ``vote score.statistic=l2``: the row's name."""
        return row_label(self.method, self.recover, self.groups, setting_text(self.setting))

    def name(self, sweep_id: str) -> str:
        """The DVC experiment name, e.g. ``vote-s0.2-20261129T0312``, ``flap-bias-s0.2-..``,
        ``vote-no-boolq-s0.2-..``, ``vote-mlp_hidden-s0.2-..``, ``vote-score.statistic_l2-s0.2-..`` (unique per
        sweep)."""
        parts = [self.method] + ([self.recover] if self.recover not in (None, "none") else []) + \
            (["_".join(self.groups)] if self.groups else []) + \
            [re.sub(r"[^A-Za-z0-9_.]+", "_", f"{k}-{v}").strip("_.") for k, v in self.setting] + \
            ([f"no-{self.held_out}"] if self.held_out else [])
        return f"{'-'.join(parts)}-s{self.sparsity:g}-{sweep_id}"

    def sets(self) -> list[str]:
        """``dvc exp run`` arguments: the point's params and, for a held-out task, its targets."""
        out = ["-S", f"prune.sparsity={self.sparsity}", "-S", f"merge.method={self.method}"]
        if self.recover:
            out += ["-S", f"prune.recover={self.recover}"]
        if self.groups:
            out += ["-S", f"prune.groups=[{','.join(self.groups)}]"]
        for key, value in self.setting:
            out += ["-S", f"{key}={value}"]
        if self.held_out:  # ``++``: add the key to the weights mapping, or replace its value
            out += ["-S", f"++merge.weights.{self.held_out}=0", f"evaluate@{self.held_out}",
                    f"evaluate_dense@{self.held_out}"]
        return out


def parse_variant(text: str) -> tuple[str, str | None]:
    """``"vote"`` -> ("vote", None); ``"vote+bias"`` -> ("vote", "bias"): a merge method, optionally with the
    ``prune.recover`` its experiment uses. Refuses unknown methods and recoveries."""
    from diet.config import RECOVERIES
    from diet.registry import MERGE_METHODS

    method, _, recover = str(text).partition("+")
    if method not in MERGE_METHODS:
        raise FlowError(f"merge method {method!r} is unknown", f"use one of: {', '.join(MERGE_METHODS.names())}")
    if recover and recover not in RECOVERIES:
        raise FlowError(f"recovery {recover!r} in {text!r} is unknown",
                        f"write METHOD+RECOVERY with one of: {', '.join(RECOVERIES)}, e.g. vote+bias")
    return method, recover or None


def parse_groups(text: str) -> tuple[str, ...]:
    """``"mlp+hidden"`` -> ("mlp", "hidden"): the dimension groups one sweep point prunes (``prune.groups``).
    Refuses unknown and repeated groups."""
    from diet.config import GROUPS

    groups = tuple(g.strip() for g in str(text).split("+"))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise FlowError(f"group {bad[0]!r} in {text!r} is unknown",
                        f"write groups joined by +, each one of: {', '.join(GROUPS)}, e.g. mlp+hidden")
    if len(set(groups)) != len(groups):
        raise FlowError(f"{text!r} names a group twice", "name each group once, e.g. mlp+hidden")
    return groups


def yaml_text(value: Any) -> str:
    """One line of YAML for a params value (``l2``, ``true``, ``0.1``, ``{mlp: 8, attention: 1}``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def setting_text(setting: tuple[tuple[str, str], ...]) -> str:
    """``score.statistic=l2 merge.normalize=rank``: a setting as the tables show it ('' for none)."""
    return " ".join(f"{k}={v}" for k, v in setting)


def _swept(key: str) -> bool:
    """Whether ``key`` is, holds or lies inside a parameter every sweep point sets itself (``SWEPT``)."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in SWEPT)


def parse_setting(text: str) -> tuple[tuple[str, str], ...]:
    """``"score.statistic=l2"`` -> ``(("score.statistic", "l2"),)``: one ablation point's params change (the value
    is YAML, written back in one canonical line). Refuses the params a sweep sets itself."""
    import yaml

    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise FlowError(f"--vary {text!r} is not KEY=VALUE", "write e.g. --vary score.statistic=l2")
    if _swept(key):
        raise FlowError(f"--vary {key} changes a parameter the sweep sets itself ({', '.join(SWEPT)})",
                        "use --methods (METHOD+bias for prune.recover), --groups or --sparsities for those")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise FlowError(f"--vary {text!r}: the value is not YAML ({e.__class__.__name__})",
                        "quote it for the shell, e.g. --vary 'select.min_keep={mlp: 0.1}'") from None
    return ((key, yaml_text(parsed)),)


def group_order(groups: str) -> tuple:
    """Sort key of a ``+``-joined groups cell: fewer groups first, then in diet.config's order."""
    from diet.config import GROUPS

    names = [g for g in str(groups).split("+") if g]
    return len(names), [GROUPS.index(g) if g in GROUPS else len(GROUPS) for g in names]


def make_points(sparsities: list[float] | None, methods: list[str] | None,
                groups: list[str] | None = None, vary: list[str] | None = None) -> list[Point]:
    """One point per (method[+recovery], groups, sparsity): ``methods`` like ``vote``, ``flap+bias``; ``groups``
    like ``mlp``, ``mlp+hidden`` (None keeps params.yaml's prune.groups). None sparsities or methods: the
    defaults. ``vary`` (``KEY=VALUE`` each, e.g. ``score.statistic=l2``) adds, per such point, one point with
    that one change: an ablation of each setting against the same point without it. Refuses empty, repeated
    and out-of-range values."""
    sparsities = [float(s) for s in (sparsities if sparsities is not None else DEFAULT_SPARSITIES)]
    methods = [str(m) for m in (methods if methods is not None else DEFAULT_METHODS)]
    if not sparsities or not methods:
        raise FlowError("the sweep needs at least one sparsity and one method", "pass e.g. sparsities=[0.1, 0.2]")
    if len(set(sparsities)) != len(sparsities) or len(set(methods)) != len(methods):
        raise FlowError("sparsities and methods must not repeat", "list each value once")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad:
        raise FlowError(f"sparsities {bad} are outside (0, 1)", "pass shares of parameters to remove, e.g. 0.2")
    variants = [parse_variant(m) for m in methods]
    combos = [parse_groups(g) for g in groups] if groups else [None]
    if len(set(combos)) != len(combos):
        raise FlowError("the group combinations repeat", "list each combination once")
    settings = [()] + [parse_setting(v) for v in vary or []]
    if len(set(settings)) != len(settings):
        raise FlowError("the --vary settings repeat", "give each KEY=VALUE once")
    points = [Point(method, sparsity, recover, groups=g, setting=st) for method, recover in variants
              for g in combos for st in settings for sparsity in sparsities]
    names = [p.name("") for p in points]
    if len(set(names)) != len(names):
        raise FlowError("two --vary values give the same experiment name", "vary values that differ in letters "
                        "or digits, not only in punctuation")
    return points


#: the model stage's output: its config gives the widths that select's constraints are checked against
BASE_MODEL = "models/base"


def check_points(root: Path, params: dict[str, Any] | None, points: list[Point]) -> bool:
    """Every point's params.yaml (the workspace's, ``params`` and the point's values) must pass the checks the
    stages run: diet.config's, and select's constraints and budget against the model's geometry when the
    workspace holds the model the sweep uses (its config only). A point that would fail in DVC's queue fails
    here, before anything runs. Returns whether the model's geometry was checked (False: the sweep's model,
    e.g. another ``model.source``, is not in the workspace yet; check again once the model stage has run)."""
    import yaml

    from diet.config import ConfigError, Params
    from diet.geometry import geometry_from_folder
    from diet.select import check_budget, check_constraints

    current = read_params(root)
    base = merged_params(current, params)
    model = root / BASE_MODEL if base.get("model") == current.get("model") and \
        (root / BASE_MODEL / "config.json").is_file() else None
    for point in points:
        values = {"prune.sparsity": point.sparsity, "merge.method": point.method}
        if point.recover:
            values["prune.recover"] = point.recover
        if point.groups:
            values["prune.groups"] = list(point.groups)
        if point.held_out:
            values[f"merge.weights.{point.held_out}"] = 0
        values.update({k: yaml.safe_load(v) for k, v in point.setting})
        try:
            checked = Params.from_dict(merged_params(base, values))
            if model is not None:  # reads the config only; a group the family cannot prune is a ConfigError
                groups, select = checked.prune.groups, checked.select
                geo = geometry_from_folder(model, groups)
                check_constraints(geo.widths, groups, select.min_keep, select.multiple)
                check_budget(geo, groups, checked.prune.sparsity, select.min_keep, select.multiple, select.layout)
        except ConfigError as e:
            raise FlowError(f"sweep point {point.label} @ {point.sparsity:g}: {e.problem}", e.fix,
                            artifact=e.artifact) from None
    return model is not None


def _blank(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def row_label(method: str, recover: Any, groups: Any = None, setting: Any = None) -> str:
    """A row's name: the merge method, with ``+bias`` when the row's model used a recovery, the pruned groups in
    brackets when given (``vote [mlp+hidden]``; a tuple or a ``+``-joined string), and the params it changes
    (``vote score.statistic=l2``)."""
    label = str(method) if recover in (None, "none") or _blank(recover) else f"{method}+{recover}"
    if not _blank(groups):
        label += f" [{groups if isinstance(groups, str) else '+'.join(groups)}]"
    return label if _blank(setting) else f"{label} {setting}"


