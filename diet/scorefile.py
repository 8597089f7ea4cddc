"""The score file: what ``score@<task>`` and ``score_generic`` write and every later stage reads.

A safetensors file of ``{group: (L, W)}`` scores and ``{group}.{moment}`` activation moments, its metadata in one
header entry and beside it as ``.json``: the model's fingerprint, the task, the data hash, the token count, the
statistic, the computation's version and a checksum of the payload. Readers check all of them against what they
expect (``read_scores``, ``read_moments``), so a file of another task or model, or one changed after writing, is
refused, naming the score file to regenerate. ``diet.scoring`` computes what goes in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from diet.errors import DataError, DietError, ModelError
from diet.io import read_json, save_tensors, sha256_file, tensors_sha256, write_json

#: metadata every score file carries (``score_version`` and ``groups`` are added by ``write_scores``)
SCORE_META_KEYS = ("model_fingerprint", "task", "task_data_hash", "n_samples", "n_tokens", "statistic",
                   "weight_norm")
_HEADER_KEY = "diet"  # one safetensors metadata entry: several entries come back in hash order
#: per-channel moments every score file carries for each group, as tensors named ``{group}.{moment}``
MOMENTS = ("mean", "var")


def moment_name(group: str, moment: str) -> str:
    """The tensor name of ``moment`` (one of MOMENTS) of ``group`` in a score file."""
    if moment not in MOMENTS:
        raise ValueError(f"unknown moment {moment!r}; known: {', '.join(MOMENTS)}")
    return f"{group}.{moment}"


def split_scores(tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Score-file tensors -> ({group: (L, W) score}, {group: {moment: (L, D)}})."""
    scores, moments = {}, {}
    for name, t in tensors.items():
        group, _, moment = name.partition(".")
        if not moment:
            scores[name] = t
        elif moment in MOMENTS:
            moments.setdefault(group, {})[moment] = t
        else:
            raise DataError(f"unknown tensor {name!r} in scores", "rescore with this version of diet")
    return scores, moments


# -- identity of what produced a score ------------------------------------------------------------------------
_CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path")


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a model folder's config.json (canonical JSON) and weight files (content, by name).

    Independent of paths, timestamps and the transformers version that wrote the config.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    weights = sorted(model_dir.glob("*.safetensors"))
    if not config_path.exists() or not weights:
        raise ModelError(f"{model_dir} is not a saved model folder (config.json and *.safetensors expected)",
                         "point to the materialised base model or a folder written by save_pretrained",
                         artifact="base_model")
    config = {k: v for k, v in read_json(config_path).items() if k not in _CONFIG_KEYS_IGNORED}
    h = hashlib.sha256()
    h.update(b"config\0" + json.dumps(config, sort_keys=True).encode() + b"\n")
    for path in weights:
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def write_scores(path: str | os.PathLike, scores: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``{group: (L, W)}`` (and moment tensors ``{group}.{moment}``, module doc) to ``path`` (safetensors)
    and its metadata to ``path`` with suffix .json, with the version of the computation (diet.versions)."""
    from diet.versions import SCORE

    missing = [k for k in SCORE_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"score metadata lacks {', '.join(missing)}")
    groups, moments = split_scores(scores)
    orphans = sorted(set(moments) - set(groups))
    if orphans:
        raise ValueError(f"moments of {', '.join(orphans)} without the group's scores")
    path = Path(path)
    tensors = {g: t.detach().to(device="cpu", dtype=torch.float32) for g, t in scores.items()}
    full = {**meta, "score_version": SCORE, "groups": sorted(groups),
            "shapes": {g: list(t.shape) for g, t in sorted(scores.items())},
            "payload_sha256": tensors_sha256(tensors)}
    save_tensors(path, tensors, metadata={_HEADER_KEY: json.dumps(full, sort_keys=True)})
    write_json(path.with_suffix(".json"), full)


def read_scores(path: str | os.PathLike, expect_fingerprint: str | None = None, *,
                expect_task: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a score file's group scores ``{group: (L, W)}`` and metadata, checked when read; refuse it when it
    was computed on another model than ``expect_fingerprint``, for another task than ``expect_task`` (``generic``
    for the generic-text scores), or when its payload no longer matches the checksum written with it. Each
    refusal names the score file to regenerate as its artifact (``task_scores:<task>`` or ``generic_scores``; the
    task is ``expect_task``, else the file's stem). The moment tensors are left out (``read_moments``)."""
    tensors, meta = _read_score_file(path, expect_fingerprint, expect_task)
    return split_scores(tensors)[0], meta


def read_moments(path: str | os.PathLike, expect_fingerprint: str | None = None,
                 groups: Sequence[str] | None = None, *,
                 expect_task: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A score file's per-channel moments ``{group: {"mean": (L, D), "var": (L, D)}}`` for ``groups`` (default:
    every group it scored), checked as ``read_scores`` checks; refuses a file without them (written before
    moments were recorded)."""
    path = Path(path)
    tensors, meta = _read_score_file(path, expect_fingerprint, expect_task)
    scores, moments = split_scores(tensors)
    lacking = [g for g in (groups if groups is not None else sorted(scores))
               if set(moments.get(g, {})) != set(MOMENTS)]
    if lacking:
        task = meta.get("task", path.stem)
        raise DataError(f"{path} carries no activation moments for {', '.join(lacking)} (it was written before "
                        "score files recorded them, or without that group)",
                        f"score {_scored(task)} again (with the group in score.groups)", artifact=_artifact(task))
    return {g: moments[g] for g in (groups if groups is not None else sorted(scores))}


def check_scored_data(score_path: str | os.PathLike, data_path: str | os.PathLike, task: str) -> None:
    """Refuse ``data_path`` (a prepared ``calib.jsonl``) unless it is the file the score file at ``score_path``
    was computed from (its ``task_data_hash``): what reads a task's calibration text beside its scores (the
    refit in the prune stage) then depends on the score file alone, which pins the text it reads."""
    meta_path = Path(score_path).with_suffix(".json")
    if not meta_path.is_file():
        raise DataError(f"no score metadata at {meta_path}", f"score {_scored(task)} first", artifact=_artifact(task))
    want = read_json(meta_path).get("task_data_hash")
    if not Path(data_path).is_file():
        raise DataError(f"prepared calibration data missing: {data_path}", f"prepare the task data for {task} first",
                        artifact=f"prepared_task:{task}")
    if sha256_file(data_path) != want:
        raise DataError(f"{data_path} is not the calibration file that {meta_path} was computed from (the task "
                        "was prepared again, or the score file is another checkout's)",
                        f"score {_scored(task)} again on it (or restore the prepared file the scores came from)",
                        artifact=_artifact(task))


def _artifact(task) -> str:
    """The artifact of the score file of ``task`` (``generic``: the generic-text scores)."""
    if task == "generic":
        return "generic_scores"
    return f"task_scores:{task}" if isinstance(task, str) and task else "task_scores"


def _scored(task: str | None) -> str:
    return "the generic text" if task == "generic" else f"task {task!r}"


def _read_score_file(path: str | os.PathLike, expect_fingerprint: str | None,
                     expect_task: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a score file and its metadata, checked: complete, its payload what was written, scored
    on the expected model, for the expected task."""
    path = Path(path)
    task = expect_task if expect_task is not None else path.stem
    fix = {"fix": f"score {_scored(task)} again to regenerate it", "artifact": _artifact(task)}
    if not path.exists():
        raise DataError(f"score file not found: {path}", **fix)
    tensors, meta = _load_score_file(path, fix)
    _check_scores(path, split_scores(tensors)[0], meta, fix)
    _check_payload(path, tensors, meta, task)
    if expect_task is not None and meta.get("task") != expect_task:
        holds = meta.get("task")
        raise DataError(f"{path} holds the scores of {'generic text' if holds == 'generic' else f'task {holds!r}'}"
                        f", not of {'generic text' if expect_task == 'generic' else f'task {expect_task!r}'} (another "
                        "task's file copied in its place, or a dvc.lock entry that names another task's output)",
                        f"score {_scored(task)} again (and commit the lock file that records it)",
                        artifact=_artifact(task))
    if expect_fingerprint is not None and meta.get("model_fingerprint") != expect_fingerprint:
        scored = meta.get("task", task)
        raise DietError(f"{path} was scored on model {meta.get('model_fingerprint')}, "
                        f"but the current model is {expect_fingerprint}",
                        f"score {_scored(scored)} again on the current model", artifact=_artifact(scored))
    return tensors, meta


def _check_payload(path: Path, tensors: dict[str, torch.Tensor], meta: dict, task: str) -> None:
    """The tensors are the bytes the writer checksummed (``payload_sha256``): a file edited or damaged after it
    was written, or a damaged DVC cache object checked out in its place, is refused whatever DVC says."""
    recorded = meta.get("payload_sha256")
    if recorded is None:
        raise DataError(f"{path} records no checksum of its scores (score_version {meta.get('score_version', '?')}"
                        ", written before score files carried one)", f"score {_scored(task)} again",
                        artifact=_artifact(task))
    actual = tensors_sha256(tensors)
    if actual != recorded:
        raise DataError(f"{path}: its scores are not the ones written (payload checksum {actual[:12]}, recorded "
                        f"{recorded[:12]}): the file, or the DVC cache object it was checked out from, was changed "
                        f"or damaged", f"score {_scored(task)} again (it rewrites the file and the local cache "
                        "object); check a shared remote with `dvc fetch` then `dvc status -c`, and `dvc push` the "
                        "fixed file", artifact=_artifact(task))


def _load_score_file(path: Path, fix: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a score file; DataError (with ``fix``: its keywords) if it is not a complete
    safetensors file with metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            scores = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise DataError(f"{path} is not a readable safetensors score file (truncated, or another format): "
                        f"{type(e).__name__}: {e}", **fix) from None
    try:
        if _HEADER_KEY in header:
            meta = json.loads(header[_HEADER_KEY])
        elif path.with_suffix(".json").exists():
            meta = read_json(path.with_suffix(".json"))
        else:
            raise DataError(f"{path} carries no score metadata", **fix)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: its score metadata is not valid JSON ({e})", **fix) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: its score metadata is not a JSON object", **fix)
    return scores, meta


def _check_scores(path: Path, scores: dict[str, torch.Tensor], meta: dict, fix: dict) -> None:
    """Metadata complete; one finite 2-D float tensor per group, as the metadata lists them."""
    missing = [k for k in (*SCORE_META_KEYS, "groups", "shapes") if k not in meta]
    if missing:
        raise DataError(f"{path}: score metadata lacks {', '.join(missing)}", **fix)
    groups, shapes = meta["groups"], meta["shapes"]
    if not isinstance(shapes, dict) or not isinstance(groups, list) or sorted(scores) != sorted(groups) \
            or any(g not in shapes for g in groups):     # shapes also lists the moment tensors
        raise DataError(f"{path}: holds groups {sorted(scores)} but its metadata lists {groups}", **fix)
    if not scores:
        raise DataError(f"{path}: holds no scores", **fix)
    for g, t in scores.items():
        if t.dim() != 2 or not t.dtype.is_floating_point:
            raise DataError(f"{path}: scores of '{g}' are a {t.dim()}-D {t.dtype} tensor, not 2-D float "
                            "(layers x dimensions)", **fix)
        if list(t.shape) != list(shapes[g]):
            raise DataError(f"{path}: scores of '{g}' have shape {list(t.shape)}, the metadata says {shapes[g]}", **fix)
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{path}: scores of '{g}' contain NaN or infinite values", **fix)
