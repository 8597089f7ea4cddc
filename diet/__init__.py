"""DIET: dimension-wise global pruning of LLMs by merging task-wise importance scores.

``import diet`` is light: it loads neither torch nor transformers, so the configuration, error and I/O
layers (``diet.config``, ``diet.errors``, ``diet.io``) serve tools that never run a model. Importing
``diet.modeling`` registers the per-layer-width model classes with transformers' Auto classes, so a
checkpoint pruned with ``layout: global`` loads with ``AutoModelForCausalLM.from_pretrained(path)``;
``diet.checkpoint.load_model(path)`` does both.
"""

__version__ = "0.1.0"

import importlib

#: names served from submodules on first use (``diet.prune`` is :func:`diet.api.prune`)
_EXPORTS = {"prune": "api"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
