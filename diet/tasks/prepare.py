"""Turn a task's source rows into seeded calibration and evaluation sets.

Output folder (one DVC artifact per task)::

    calib.jsonl   n_samples rows drawn from the calibration split
    eval.jsonl    evaluate.limit rows drawn from the evaluation split (all when limit is null)
    eval.json     what scoring the evaluation rows needs besides them (partial scoring, target delimiter):
                  it changes only with the task's evaluation, so the evaluate stages depend on it and
                  eval.jsonl alone, never on the calibration settings
    meta.json     counts, splits, seeds, sha256 of both files, the source

Row: ``{"id", "context", "choices", "label"}``; the scored string of choice ``i`` is
``context + target_delimiter + choices[i]``. Partial-scoring tasks (WinoGrande) have one context per choice
and the same continuation as every choice. Calibration rows also carry ``text``: the gold item as the model
reads it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from diet.errors import DataError
from diet.io import atomic_dir, read_json, sha256_file, write_json, write_jsonl
from diet.tasks.sources import load_rows
from diet.tasks.spec import TaskSpec

#: the part of meta.json that evaluation reads (eval.json)
EVAL_META_KEYS = ("task", "partial", "target_delimiter", "eval_split", "eval_seed", "n_eval", "n_eval_available")
POOL_SEED = 20240  # fixed: the calibration/evaluation partition of a shared split never moves


def calibration_text(row: dict, delimiter: str = " ") -> str:
    ctx = row["context"][row["label"]] if isinstance(row["context"], list) else row["context"]
    return ctx + delimiter + row["choices"][row["label"]]


def _fmt(template: str, row: dict, spec: TaskSpec) -> str:
    try:
        return template.format_map(row)
    except KeyError as e:
        fields = ", ".join(k for k in row if not k.startswith("_"))
        raise DataError(f"task '{spec.name}': template {template!r} uses field {e} that rows do not have",
                        f"use the row fields: {fields} (file {spec.path})") from None


def _winogrande(row: dict, spec: TaskSpec) -> tuple[list[str], list[str]]:
    sentence = row["sentence"]
    cut = sentence.index("_")
    continuation = sentence[cut + 1:].strip()
    contexts = [sentence[:cut] + row[f"option{k}"] for k in (1, 2)]
    return contexts, [continuation, continuation]


PREPROCESS = {"winogrande": _winogrande}


def to_item(row: dict, spec: TaskSpec) -> dict[str, Any]:
    """One source row -> one prepared item (validates the label)."""
    if spec.preprocess:
        context, choices = PREPROCESS[spec.preprocess](row, spec)
    else:
        context = _fmt(spec.prompt, row, spec)
        if isinstance(spec.choices, str):
            if spec.choices not in row:
                raise DataError(f"task '{spec.name}': choices field '{spec.choices}' is not in the rows",
                                f"use one of: {', '.join(k for k in row if not k.startswith('_'))}")
            value = row[spec.choices]
            if not isinstance(value, (list, tuple)) or len(value) < 2:
                raise DataError(f"task '{spec.name}' (task file {spec.path}), row {row.get('_id')}: choices field "
                                f"'{spec.choices}' holds {value!r}; a multiple-choice item needs a list of at "
                                "least 2 choices",
                                f"fix that row of the data, or point 'choices' in {spec.path} at a field holding "
                                "a list")
            choices = [str(c) for c in value]
        else:
            choices = [_fmt(t, row, spec) for t in spec.choices]
    if spec.label not in row:
        raise DataError(f"task '{spec.name}': label field '{spec.label}' is not in the rows",
                        f"use one of: {', '.join(k for k in row if not k.startswith('_'))}")
    raw = row[spec.label]
    if spec.label_map is not None:
        if str(raw) not in {str(k) for k in spec.label_map}:
            raise DataError(f"task '{spec.name}', row {row['_id']}: label {raw!r} is not a key of label_map",
                            f"add it to label_map in {spec.path}")
        label = {str(k): v for k, v in spec.label_map.items()}[str(raw)]
    elif isinstance(raw, bool):
        label = int(raw)
    elif isinstance(raw, int):
        label = raw
    elif isinstance(raw, str) and raw in choices:
        label = choices.index(raw)
    else:
        label = None
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"task '{spec.name}', row {row['_id']}: label {raw!r} is outside the "
                        f"{len(choices)} choices {choices}",
                        f"fix the row, or map labels to choice indices with label_map in {spec.path}")
    return {"id": row["_id"], "context": context, "choices": choices, "label": label}


def _sample(n: int | None, pool: list, seed: int) -> list:
    """``n`` items of ``pool`` drawn with ``seed``, kept in pool order (all of it when n is None)."""
    if n is None or n >= len(pool):
        return list(pool)
    idx = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in idx]


def prepare_task(spec: TaskSpec, out_dir: str | Path, *, n_samples: int, seed: int,
                 eval_limit: int | None, eval_seed: int) -> dict:
    """Write calib.jsonl, eval.jsonl and meta.json for ``spec`` into ``out_dir`` (atomically)."""
    calib_rows = load_rows(spec.name, spec.source, spec.calibration_split)
    if spec.shared_split:
        pool = list(calib_rows)
        random.Random(POOL_SEED).shuffle(pool)
        k = spec.calibration_pool
        if k >= len(pool):
            raise DataError(f"task '{spec.name}': calibration_pool {k} leaves no evaluation rows "
                            f"(split '{spec.evaluation_split}' has {len(pool)})",
                            f"set calibration_pool below {len(pool)} in {spec.path}")
        calib_rows, eval_rows = sorted(pool[:k], key=_order), sorted(pool[k:], key=_order)
    else:
        eval_rows = load_rows(spec.name, spec.source, spec.evaluation_split)
    if n_samples > len(calib_rows):
        raise DataError(f"task '{spec.name}': calibration.n_samples = {n_samples} is larger than the "
                        f"{len(calib_rows)} rows available for calibration",
                        f"set calibration.n_samples <= {len(calib_rows)} in params.yaml")
    calib = [to_item(r, spec) for r in _sample(n_samples, calib_rows, seed)]
    for item in calib:
        item["text"] = calibration_text(item, spec.target_delimiter)
    evals = [to_item(r, spec) for r in _sample(eval_limit, eval_rows, eval_seed)]
    overlap = {c["id"] for c in calib} & {e["id"] for e in evals} if spec.shared_split else set()
    if overlap:  # pragma: no cover - the partition above makes this impossible
        raise DataError(f"task '{spec.name}': calibration and evaluation share rows {sorted(overlap)[:5]}")
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "calib.jsonl", calib)
        write_jsonl(tmp / "eval.jsonl", evals)
        meta = {
            # the source as written in the task file: no absolute paths, so clones prepare identical bytes
            "task": spec.name, "description": spec.description, "source": spec.source_as_written or spec.source,
            "calib_split": spec.calibration_split, "eval_split": spec.evaluation_split,
            "shared_split": spec.shared_split, "calibration_pool": spec.calibration_pool,
            "n_calib": len(calib), "n_eval": len(evals), "n_eval_available": len(eval_rows),
            "seed": seed, "eval_seed": eval_seed, "target_delimiter": spec.target_delimiter,
            "partial": bool(spec.preprocess) or spec.partial, "n_choices": sorted({len(e["choices"]) for e in evals}),
            "sha256": {"calib.jsonl": sha256_file(tmp / "calib.jsonl"), "eval.jsonl": sha256_file(tmp / "eval.jsonl")},
        }
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "eval.json", {k: meta[k] for k in EVAL_META_KEYS})
    return meta


def _order(row: dict) -> tuple:
    split, _, idx = row["_id"].rpartition("-")
    return (split, int(idx)) if idx.isdigit() else (split, 0)


def read_prepared(task_dir: str | Path, which: str = "eval") -> tuple[list[dict], dict]:
    """Rows of ``calib`` or ``eval`` and the meta of one prepared task folder, each checked when read."""
    task_dir = Path(task_dir)
    path = task_dir / f"{which}.jsonl"
    if not path.exists() or not (task_dir / "meta.json").exists():
        raise DataError(f"prepared task data missing: {path}", f"prepare the task data for {task_dir.name} first",
                        artifact=f"prepared_task:{task_dir.name}")
    fix, artifact = f"prepare the task data for {task_dir.name} again", f"prepared_task:{task_dir.name}"
    try:
        meta = read_json(task_dir / "meta.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{task_dir / 'meta.json'} is not valid JSON ({e})", fix, artifact=artifact) from None
    if not isinstance(meta, dict):
        raise DataError(f"{task_dir / 'meta.json'} is not a JSON object", fix, artifact=artifact)
    need = ("text",) if which == "calib" else ("context", "choices", "label")
    return read_rows(path, need, task=task_dir.name), meta


def read_calibration(path: str | Path, task: str) -> list[str]:
    """The ``text`` of every row of a prepared ``calib.jsonl``, checked when read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared calibration data missing: {path}", f"prepare the task data for {task} first",
                        artifact=f"prepared_task:{task}")
    return [row["text"] for row in read_rows(path, ("text",), task=task)]


def read_rows(path: Path, need: tuple[str, ...], *, task: str) -> list[dict]:
    """A prepared JSONL file whose every row is an object with the fields ``need``; DataError otherwise."""
    fix = f"the file is damaged or from another version: prepare the task data for {task} again"
    artifact = f"prepared_task:{task}"
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})", fix, artifact=artifact) from None
                missing = [k for k in need if not isinstance(row, dict) or k not in row]
                if missing:
                    raise DataError(f"{path}, line {n}: row lacks {', '.join(missing)}", fix, artifact=artifact)
                if "text" in need and not isinstance(row["text"], str):
                    raise DataError(f"{path}, line {n}: 'text' is {type(row['text']).__name__}, not a string", fix,
                                    artifact=artifact)
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason})", fix, artifact=artifact) from None
    if not rows:
        raise DataError(f"{path} is empty: it holds no rows", fix, artifact=artifact)
    return rows
