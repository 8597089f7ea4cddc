"""DIET: dimension-wise global pruning of LLMs by merging task-wise importance scores.

Importing ``diet`` registers the per-layer-width model classes with transformers' Auto classes, so a
checkpoint pruned with ``layout: global`` loads with ``AutoModelForCausalLM.from_pretrained(path)``.
"""

__version__ = "0.1.0"

try:  # registration needs torch + transformers; the config layer must import without them
    from diet import modeling as _modeling  # noqa: F401
except ImportError:  # pragma: no cover
    pass
