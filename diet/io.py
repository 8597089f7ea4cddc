"""Atomic artifact writes: a stage either leaves a complete artifact or none.

Every writer goes through a temporary sibling and an ``os.replace``; a directory artifact is built in a
temporary sibling directory and swapped in whole. A crash or an exception leaves the previous artifact (or
nothing) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping


def package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (data wheels ship files there);
    None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    return Path(name)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces directory ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def check_writable(*paths: str | os.PathLike, need_bytes: int = 0) -> None:
    """Refuse, before a long computation, an output that could not be written: for each path, the nearest
    folder that exists must be a folder in which a file can be created (probed with a temporary file, which also
    holds for root, whom permission bits do not stop), with ``need_bytes`` free on its disk (the expected size of
    the output; 0: not checked). Raises DietError naming the path and the folder."""
    from diet.errors import DietError

    for path in paths:
        target = Path(path).absolute()
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        problem = None
        if not folder.is_dir():
            problem = f"{folder} is a file, not a folder"
        else:
            try:
                fd, probe = tempfile.mkstemp(prefix=".diet-probe-", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as e:
                problem = f"no file can be created in {folder} ({e.strerror or e})"
        if not problem and need_bytes and (free := shutil.disk_usage(folder).free) < need_bytes:
            raise DietError(f"cannot write the output {path}: it needs about {need_bytes / 2**20:,.0f} MiB and the "
                            f"disk of {folder} has {free / 2**20:,.0f} MiB free",
                            "free disk space (or point the output elsewhere), then rerun; nothing was computed yet")
        if problem:
            raise DietError(f"cannot write the output {path}: {problem}",
                            f"make {folder} writable (or free the path), then rerun; nothing was computed yet")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file.

    Byte-identical for identical input only with at most one metadata entry: safetensors writes several
    entries in hash order, which changes between processes. Put structured metadata in one JSON entry.
    """
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata=metadata)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over tensors in name order: each one's name, dtype, shape and raw bytes. The payload checksum an
    artifact records beside its tensors, so that a reader can tell that what it holds is what was written."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()
