"""Lazy registry of model-family adapters, keyed by ``config.model_type``.

Each entry is ``"module:Class"``, imported on first use. A checkpoint pruned with per-layer widths has the
model_type ``diet_<family>`` (see ``diet.modeling``) and uses its family's adapter. A new family is one
adapter file and one line here (docs/extending.md lists the tests that go with it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from diet.errors import ModelError

if TYPE_CHECKING:
    from diet.adapters.base import ModelAdapter

SUPPORTED: dict[str, str] = {
    "llama": "diet.adapters.llama:LlamaAdapter",
    "gemma2": "diet.adapters.gemma2:Gemma2Adapter",
    "gemma3_text": "diet.adapters.gemma3:Gemma3TextAdapter",
    "qwen2": "diet.adapters.qwen2:Qwen2Adapter",
    "mistral": "diet.adapters.mistral:MistralAdapter",
}


def pruned_model_type(model_type: str) -> str:
    """The model_type of a per-layer-width checkpoint of family ``model_type``."""
    return f"diet_{model_type}"


#: per-layer-width model_type -> family model_type
PRUNED: dict[str, str] = {pruned_model_type(t): t for t in SUPPORTED}


def family(model_type: str) -> str:
    """The family (a key of SUPPORTED) of ``model_type``, stock or pruned; ModelError if unsupported."""
    model_type = PRUNED.get(model_type, model_type)
    if model_type not in SUPPORTED:
        raise ModelError(f"model_type {model_type!r} has no adapter",
                         f"use a model of a supported family: {', '.join(SUPPORTED)} "
                         "(or add an adapter in diet/adapters/)")
    return model_type


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for ``model_type`` (stock or pruned), imported on use."""
    module, name = SUPPORTED[family(model_type)].split(":")
    return getattr(importlib.import_module(module), name)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ModelError(f"{type(model).__name__} has no config.model_type",
                         "pass a transformers causal LM (e.g. from AutoModelForCausalLM)")
    return adapter_class(model_type)(model)
