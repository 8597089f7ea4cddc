"""Evaluation: zero-shot accuracy (lm-eval, or the direct scorer), held-out perplexity, reports.

* ``harness.evaluate_tasks``: lm-evaluation-harness on prepared tasks (the reference; all lm-eval imports)
* ``loglik.evaluate_tasks_direct``: the same figures without lm-eval, each shared context run once
* ``perplexity.heldout_perplexity``: perplexity on held-out Wikipedia passages
* ``report.markdown_table``: metrics as markdown, with deltas against the dense model

Submodules load on first use: importing this package pulls in neither torch nor lm-eval.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_tasks": "harness",
    "task_config": "harness",
    "evaluate_tasks_direct": "loglik",
    "score_task": "loglik",
    "heldout_perplexity": "perplexity",
    "markdown_table": "report",
    "mean_accuracy": "report",
    "load_eval_task": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
