"""The version of each computation whose result the pipeline caches: what the code contributes to a cache key.

An expensive result (a task's score file, the dense model's evaluation of a task) is worth hours on the models
users prune, so it must be recomputed when what it computes changes, and only then. A stage that caches such a
result declares the data and the params it reads and one entry of this file (dvc.yaml:
``params: - diet/versions.py: [SCORE]``), not the source text of the modules it imports: a refactor, a
docstring or a new feature elsewhere leaves every cached result valid.

Bump an entry (and say so in the commit message) in the change that alters the bytes (or per-item values) of
what it names; the golden tests (tests/test_golden.py) compute each on tiny models and fail, naming the entry
to bump, when its output changes while its version did not. Each value is a plain integer so that DVC reads
this file as a params file.
"""

from __future__ import annotations

#: the base checkpoint ``stages.model`` writes from ``model.source`` (diet.model_sources)
MODEL = 1
#: a task's calibration and evaluation items (``stages.prepare``: diet.tasks)
PREPARE = 1
#: a task's score file (``stages.score``: diet.scoring)
SCORE = 2
#: the task-agnostic score file (``stages.score_generic``: diet.generic, diet.scoring)
GENERIC = 2
#: a model's per-item results on a task (``stages.evaluate``: diet.evaluation, both backends)
EVALUATE = 1
#: a model's perplexity on the held-out passages (``stages.perplexity``: diet.evaluation.perplexity)
PERPLEXITY = 2

#: the entries above, by the lower-case name the metadata of each result records
NAMES = ("model", "prepare", "score", "generic", "evaluate", "perplexity")


def version(name: str) -> int:
    """The version of computation ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise KeyError(f"no computation version {name!r}: one of {', '.join(NAMES)}")
    return globals()[name.upper()]
