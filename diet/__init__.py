"""DIET: dimension-wise global pruning of LLMs by merging task-wise importance scores.

Importing ``diet`` registers the per-layer-width model classes with transformers' Auto classes, so a
checkpoint pruned with ``layout: global`` loads with ``AutoModelForCausalLM.from_pretrained(path)``.
"""

__version__ = "0.1.0"

import importlib.util as _util

if _util.find_spec("torch") and _util.find_spec("transformers"):  # the config layer imports without them
    from diet import modeling as _modeling  # noqa: F401


def prune(model, tokenizer, tasks, sparsity=0.2, **kwargs):
    """Prune ``model`` for ``tasks`` ({name: calibration texts}); see :func:`diet.api.prune`."""
    from diet.api import prune as _prune

    return _prune(model, tokenizer, tasks, sparsity, **kwargs)
