"""Prepared evaluation data of one task, read and checked once for every scorer.

A prepared task folder (written by the prepare stage) holds ``eval.jsonl`` and ``eval.json`` (the task's
partial-scoring flag and target delimiter). A row is

* ``{"id", "context": str, "choices": [str, ...], "label": int}``: the choices are continuations of one
  context (ARC, BoolQ, HellaSwag, ...);
* ``{"id", "context": [str per choice], "choices": [str] * k, "label": int}`` when ``meta["partial"]``: each
  choice has its own context and they share one continuation (partial scoring, WinoGrande).

The scored string of choice ``i`` is ``context_i + meta["target_delimiter"] + choices[i]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diet.errors import DataError


@dataclass(frozen=True)
class EvalTask:
    name: str
    eval_path: Path               # absolute path of eval.jsonl
    meta: dict
    rows: tuple[dict, ...]

    @property
    def partial(self) -> bool:
        return bool(self.meta.get("partial", False))

    @property
    def delimiter(self) -> str:
        return self.meta.get("target_delimiter", " ")


def load_eval_task(name: str, data_dir: str | Path, limit: int | None = None) -> EvalTask:
    """Read and validate ``data_dir/{eval.jsonl, eval.json}``; every problem names the task."""
    data_dir = Path(data_dir)
    fix, artifact = f"prepare the task data for {name} again", f"prepared_task:{name}"
    eval_path, meta_path = data_dir / "eval.jsonl", data_dir / "eval.json"
    if not eval_path.is_file():
        raise DataError(f"task '{name}': no evaluation data at {eval_path}", fix, artifact=artifact)
    if not meta_path.is_file():
        raise DataError(f"task '{name}': no eval.json at {meta_path}", fix, artifact=artifact)
    try:
        meta = json.loads(meta_path.read_text())
        with open(eval_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"task '{name}': unreadable data in {data_dir}: {e}", fix, artifact=artifact) from e
    if not rows:
        raise DataError(f"task '{name}': {eval_path} has no rows", fix, artifact=artifact)
    if limit is not None:
        rows = rows[:limit]
    task = EvalTask(name=name, eval_path=eval_path.resolve(), meta=meta, rows=tuple(rows))
    for i, row in enumerate(rows):
        _check_row(task, i, row)
    return task


def _check_row(task: EvalTask, i: int, row: dict) -> None:
    where = f"task '{task.name}', row {i} (id {row.get('id')!r}) of {task.eval_path}"
    fix = "re-run the prepare stage; a row is {id, context, choices, label}"
    missing = [k for k in ("id", "context", "choices", "label") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}", fix)
    choices, label, context = row["choices"], row["label"], row["context"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must list at least two non-empty strings", fix)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label!r} is not an index into {len(choices)} choices", fix)
    if task.partial:
        if not isinstance(context, list) or len(context) != len(choices) or not all(
                isinstance(c, str) and c for c in context):
            raise DataError(f"{where}: a partial-scoring row needs one non-empty context per choice", fix)
        if len(set(choices)) != 1:
            raise DataError(f"{where}: a partial-scoring row repeats one continuation in 'choices'", fix)
    elif not isinstance(context, str) or not context:
        raise DataError(f"{where}: 'context' must be a non-empty string", fix)
