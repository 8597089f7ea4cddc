"""A task file maps rows of any dataset to a zero-shot multiple-choice item: prompt, choices, label.

Example (``data/tasks/my_task.yaml``)::

    description: my yes/no questions
    source:
      datasets: {path: json, data_files: {train: my/train.jsonl, validation: my/val.jsonl}}
    splits: {calibration: train, evaluation: validation}
    prompt: "{passage}\\nQuestion: {question}?\\nAnswer:"
    choices: ["no", "yes"]          # a list of templates, or the name of a field holding a list
    label: answer                   # field with the gold choice: an index, or the choice's text
    label_map: {"false": 0, "true": 1}   # optional: raw label value -> choice index

Relative ``data_files`` are resolved against the task file's folder. Templates name plain row fields only
(``{question}``): attributes, indexing, positional fields, conversions and format specs are refused when the
task file is read, and a literal ``choices`` list needs at least two entries.
"""

from __future__ import annotations

import dataclasses
import difflib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diet.config import check_task_name
from diet.errors import ConfigError

SOURCE_KINDS = ("olmo", "hf_disk", "datasets")
PREPROCESSORS = ("winogrande",)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: dict[str, Any]
    prompt: str | None = None
    choices: str | list[str] | None = None
    label: str | None = None
    description: str = ""
    splits: dict[str, str] = field(default_factory=lambda: {"calibration": "train", "evaluation": "validation"})
    label_map: dict[str, int] | None = None
    target_delimiter: str = " "
    preprocess: str | None = None
    partial: bool = False
    calibration_pool: int | None = None
    path: str = ""
    source_as_written: dict[str, Any] | None = None  # ``source`` before relative paths were resolved

    @property
    def calibration_split(self) -> str:
        return self.splits["calibration"]

    @property
    def evaluation_split(self) -> str:
        return self.splits["evaluation"]

    @property
    def shared_split(self) -> bool:
        return self.calibration_split == self.evaluation_split


REQUIRED = ("source", "label")


def _err(path: Path, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"task file {path}: {problem}", fix)


def load_task(name: str, task_dir: str | Path = "data/tasks") -> TaskSpec:
    """Read and validate ``{task_dir}/{name}.yaml``."""
    check_task_name(name)
    task_dir = Path(task_dir)
    path = task_dir / f"{name}.yaml"
    if not path.exists():
        known = available_tasks(task_dir)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown task '{name}'{hint}: no file {path}",
                          f"use one of: {', '.join(known) or '(none)'}; or add {path} (see README, 'Add a task')")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML: {e}", "fix the YAML syntax") from e
    if not isinstance(raw, dict):
        raise _err(path, "must be a mapping of fields", "see data/tasks/arc_easy.yaml for an example")
    known = [f.name for f in dataclasses.fields(TaskSpec) if f.name not in ("path", "source_as_written")]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise _err(path, f"unknown field '{key}'",
                       f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(known)}")
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise _err(path, f"'name: {raw['name']}' differs from the file name '{name}'", f"set name: {name}")
    for key in REQUIRED:
        if raw.get(key) in (None, "", [], {}):
            raise _err(path, f"missing field '{key}'", _FIELD_HELP[key])
    if not raw.get("partial") and raw.get("preprocess") is None:
        for key in ("prompt", "choices"):
            if raw.get(key) in (None, "", []):
                raise _err(path, f"missing field '{key}'", _FIELD_HELP[key])
    src = raw["source"]
    if not isinstance(src, dict) or len(src) != 1 or next(iter(src)) not in SOURCE_KINDS:
        raise _err(path, f"'source' must have exactly one of {', '.join(SOURCE_KINDS)}", _FIELD_HELP["source"])
    _check_templates(path, raw)
    if raw.get("preprocess") is not None and raw["preprocess"] not in PREPROCESSORS:
        raise _err(path, f"unknown preprocess '{raw['preprocess']}'", f"use one of: {', '.join(PREPROCESSORS)}")
    splits = {"calibration": "train", "evaluation": "validation", **(raw.get("splits") or {})}
    if set(splits) != {"calibration", "evaluation"}:
        raise _err(path, f"'splits' has keys {sorted(splits)}", "use splits: {calibration: train, evaluation: validation}")
    raw["splits"] = splits
    if splits["calibration"] == splits["evaluation"] and not raw.get("calibration_pool"):
        raise _err(path, f"calibration and evaluation both use split '{splits['evaluation']}'",
                   "set calibration_pool: N to reserve N rows of that split for calibration "
                   "(the rest is evaluated), or use different splits")
    raw["source_as_written"] = src
    if "datasets" in src:
        src = {"datasets": _resolve_files(dict(src["datasets"] or {}), path.parent)}
        raw["source"] = src
    return TaskSpec(**raw, path=str(path))


def _check_templates(path: Path, raw: dict) -> None:
    """``prompt`` and literal ``choices``: python format strings over plain row fields, two choices at least."""
    choices = raw.get("choices")
    if isinstance(choices, list):
        if len(choices) < 2:
            raise _err(path, f"'choices' lists {len(choices)} choice(s); a multiple-choice item needs at least 2",
                       _FIELD_HELP["choices"])
        templates = [("choices", c) for c in choices]
    elif choices is None or isinstance(choices, str):
        templates = []
    else:
        raise _err(path, f"'choices' must be a list of templates or a field name, got {type(choices).__name__}",
                   _FIELD_HELP["choices"])
    if raw.get("prompt") is not None:
        templates.insert(0, ("prompt", raw["prompt"]))
    for key, template in templates:
        if not isinstance(template, str):
            raise _err(path, f"'{key}' holds {template!r}, not a text template", _FIELD_HELP[key])
        problem = template_problem(template)
        if problem:
            raise _err(path, f"'{key}' template {template!r}: {problem}",
                       "use plain row fields only, e.g. \"Question: {question}\\nAnswer:\"; write {{ and }} "
                       "for literal braces")


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a format string over plain field names (``{question}``), or None if it is.

    Indexing, attributes, positional fields, conversions and format specs are refused: a task file must not
    reach into python objects (``{question.__class__}``) and each field must name a column of the rows.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"not a valid format string ({e})"
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if not field_name.isidentifier():
            what = "an empty field {}" if not field_name else f"field {{{field_name}}}"
            return f"{what} is not a plain field name"
        if conversion or spec:
            return f"field {{{field_name}}} carries a conversion or format spec; only plain {{{field_name}}} is allowed"
    return None


def _resolve_files(kwargs: dict, base: Path) -> dict:
    files = kwargs.get("data_files")
    if isinstance(files, str):
        kwargs["data_files"] = _abs(files, base)
    elif isinstance(files, dict):
        kwargs["data_files"] = {k: _abs(v, base) if isinstance(v, str) else [_abs(x, base) for x in v]
                                for k, v in files.items()}
    return kwargs


def _abs(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def local_files(spec: TaskSpec) -> list[Path]:
    """The local files a task reads (its resolved ``data_files``; none for the shipped sources)."""
    files = (spec.source.get("datasets") or {}).get("data_files") if "datasets" in spec.source else None
    if isinstance(files, str):
        files = [files]
    elif isinstance(files, dict):
        files = [x for v in files.values() for x in ([v] if isinstance(v, str) else v)]
    return [Path(f) for f in files or []]


def check_outside(spec: TaskSpec, outputs: list[Path]) -> None:
    """Refuse a task whose data files lie inside a pipeline output (a folder DVC empties before its stage runs).

    ``outputs`` are absolute paths of the pipeline's outputs, files or folders.
    """
    for f in local_files(spec):
        f = f.resolve()
        for out in outputs:
            out = out.resolve()
            if f == out or out in f.parents:
                raise ConfigError(
                    f"task file {spec.path}: data file {f} lies inside {out}, an output of the pipeline; DVC "
                    "deletes an output's contents before the stage that writes it runs",
                    f"move the task's source files to a folder of their own (e.g. data/sources/{spec.name}/) "
                    f"and point data_files at it (relative to {Path(spec.path).parent})")


def available_tasks(task_dir: str | Path = "data/tasks") -> list[str]:
    return sorted(p.stem for p in Path(task_dir).glob("*.yaml"))


_FIELD_HELP = {
    "source": "add e.g. source: {datasets: {path: json, data_files: {train: train.jsonl, validation: val.jsonl}}}",
    "label": "add label: <field holding the gold choice (index or text)>",
    "prompt": "add prompt: \"Question: {question}\\nAnswer:\" (python format over the row's fields)",
    "choices": "add choices: <field holding a list>  or  choices: [\"no\", \"yes\"]",
}
