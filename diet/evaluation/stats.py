"""Paired comparison of two models' zero-shot accuracy on the same items, with bootstrap intervals.

Pure numpy: no model, no lm-eval. Input is each model's per-item correctness, per task::

    {task: {item_id: 0 or 1}}                      one metric (e.g. acc)
    {task: {item_id: {"acc": 0/1, "acc_norm": 0/1}}}   several metrics (``compare_metrics``)

API:

* ``paired_bootstrap(reference, candidate, *, n_resamples, confidence, seed)`` ->
  ``{task: PairedDifference, ..., MEAN: PairedDifference}`` for one metric. The difference is
  ``candidate - reference``; ``MEAN`` is the difference of the mean over tasks of per-task accuracies.
* ``compare_metrics(reference, candidate, metrics=("acc", "acc_norm"), ...)`` ->
  ``{metric: {task | MEAN: PairedDifference}}``.
* ``perplexity_difference(reference, candidate, ...)`` -> one ``PairedDifference`` of perplexity over the same
  held-out passages (``per_doc`` of ``diet.evaluation.perplexity``), resampling passages.
* ``format_interval(value, low, high)`` -> ``+0.031 [+0.004, +0.058]``, the one text of an interval; and
  ``format_difference(d, digits=3)`` -> a table cell such as ``+0.031 [+0.004, +0.058]*`` (the star marks an
  interval that excludes zero).

The interval is a percentile bootstrap, paired: one resample draws ``n`` items with replacement from a task's
``n`` items and takes both models' results on the same draw, so the correlation between the two models
(most items are right or wrong for both) narrows the interval as it should. Tasks are resampled
independently; resample ``r`` of the mean over tasks is the mean over tasks of their resample ``r``, so the
mean's interval accounts for every task's sampling noise at once. Each task draws from its own generator,
seeded by ``(seed, task name)``: a task's interval does not change when another task is added, and the same
seed gives identical intervals.

Item sets must match exactly (same tasks, same item ids in each task): anything else is refused, since an
unpaired comparison would silently mix item difficulty into the difference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from diet.errors import DataError

#: key of the mean over tasks in the results
MEAN = "mean"
DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
#: resamples drawn at once per task: bounds memory to chunk * items integers
_CHUNK = 1_000


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - reference`` accuracy and its bootstrap interval."""

    diff: float          # observed difference in accuracy (for MEAN: in mean accuracy over tasks)
    low: float           # lower end of the interval
    high: float          # upper end
    n_items: int         # items compared (for MEAN: over all tasks)
    confidence: float
    significant: bool = field(init=False)  # the interval excludes zero

    def __post_init__(self):
        object.__setattr__(self, "significant", bool(self.low > 0.0 or self.high < 0.0))


def _paired_arrays(reference: Mapping, candidate: Mapping,
                   binary: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{task: (ref (n,), cand (n,))}`` aligned by item id; refuses sets that do not match, and values that are
    not 0 or 1 (``binary``) or not finite."""
    if set(reference) != set(candidate):
        only_ref, only_cand = sorted(set(reference) - set(candidate)), sorted(set(candidate) - set(reference))
        raise DataError(f"the two models were evaluated on different tasks (only the reference: {only_ref}, "
                        f"only the candidate: {only_cand})", "compare evaluations of the same task list")
    if not reference:
        raise DataError("no task to compare", "pass per-item results of at least one task")
    out = {}
    for task in sorted(reference):
        ref, cand = reference[task], candidate[task]
        if set(ref) != set(cand):
            missing, extra = len(set(ref) - set(cand)), len(set(cand) - set(ref))
            raise DataError(f"task {task}: the item ids differ ({missing} only in the reference, {extra} only in "
                            "the candidate)", "evaluate both models on the same items (same evaluate.limit and "
                            "evaluate.seed)")
        if not ref:
            raise DataError(f"task {task} has no items", "evaluate at least one item per task")
        ids = sorted(ref, key=str)
        pair = (np.array([ref[i] for i in ids], dtype=np.float64),          # (n,)
                np.array([cand[i] for i in ids], dtype=np.float64))         # (n,)
        for values in pair:
            if binary and not np.isin(values, (0.0, 1.0)).all():
                raise DataError(f"task {task}: per-item correctness must be 0 or 1",
                                "pass acc / acc_norm of each item, not log-likelihoods")
            if not np.isfinite(values).all():
                raise DataError(f"task {task}: per-item values must be finite numbers",
                                "rerun the evaluation that wrote them")
        out[task] = pair
    return out


def _task_seed(seed: int, task: str) -> list[int]:
    return [int(seed), int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")]


def _resampled_diffs(diff: np.ndarray, n_resamples: int, seed: list[int]) -> np.ndarray:
    """Mean of ``diff`` (n,) over ``n_resamples`` draws of n items with replacement: (R,)."""
    rng = np.random.default_rng(seed)
    n = diff.size
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))                             # (r, n)
        out[start:start + size] = diff[idx].mean(axis=1)                     # (r,)
    return out


def paired_bootstrap(reference: Mapping[str, Mapping], candidate: Mapping[str, Mapping], *,
                     n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                     seed: int = 0, binary: bool = True) -> dict[str, PairedDifference]:
    """Per-task and mean-over-tasks ``candidate - reference`` accuracy with paired bootstrap intervals.
    ``binary=False`` accepts any finite per-item value (a divergence, say) in place of 0/1 correctness."""
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    pairs = _paired_arrays(reference, candidate, binary)
    tail = (1.0 - confidence) / 2
    results, resampled = {}, []
    for task, (ref, cand) in pairs.items():
        diff = cand - ref                                                    # (n,)
        boot = _resampled_diffs(diff, n_resamples, _task_seed(seed, task))   # (R,)
        resampled.append(boot)
        low, high = np.quantile(boot, [tail, 1.0 - tail])
        results[task] = PairedDifference(float(diff.mean()), float(low), float(high), diff.size, confidence)
    mean_boot = np.mean(resampled, axis=0)                                   # (R,): tasks resampled jointly
    low, high = np.quantile(mean_boot, [tail, 1.0 - tail])
    observed = float(np.mean([results[t].diff for t in pairs]))
    results[MEAN] = PairedDifference(observed, float(low), float(high),
                                     sum(r.n_items for r in results.values()), confidence)
    return results


def compare_metrics(reference: Mapping[str, Mapping[object, Mapping[str, float]]],
                    candidate: Mapping[str, Mapping[object, Mapping[str, float]]],
                    metrics: Sequence[str] = ("acc", "acc_norm"), **kwargs) -> dict[str, dict[str, PairedDifference]]:
    """``paired_bootstrap`` for each metric of per-item results ``{task: {item_id: {metric: 0/1}}}``."""
    def pick(results, metric, who):
        out = {}
        for task, items in results.items():
            try:
                out[task] = {i: r[metric] for i, r in items.items()}
            except KeyError:
                raise DataError(f"the {who}'s results of task {task} lack the metric {metric!r}",
                                "compare only metrics both models report, e.g. metrics=('acc',)") from None
        return out

    return {m: paired_bootstrap(pick(reference, m, "reference"), pick(candidate, m, "candidate"), **kwargs)
            for m in metrics}


def perplexity_difference(reference: Mapping[str, Sequence], candidate: Mapping[str, Sequence], *,
                          n_resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                          seed: int = 0) -> PairedDifference:
    """``candidate - reference`` perplexity over the same passages, with a paired bootstrap over passages.

    Each argument is a perplexity result's ``per_doc`` (``{"nll": [summed NLL per passage], "tokens": [...]}``,
    ``diet.evaluation.perplexity``). A resample draws passages with replacement and takes both models'
    token-weighted perplexity, ``exp(sum nll / sum tokens)``, on the same draw. Refused unless both hold the same
    passages (the same token counts, in the same order). A result without per-passage values names, as the
    artifact to regenerate, the dense model's perplexity for the reference and the pruned model's for the
    candidate.
    """
    def arrays(per_doc, who, artifact):
        try:
            nll, tokens = np.asarray(per_doc["nll"], dtype=np.float64), np.asarray(per_doc["tokens"], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"the {who}'s perplexity result has no per-passage values (per_doc)",
                            "measure its perplexity again", artifact=artifact) from None
        if nll.ndim != 1 or nll.shape != tokens.shape or not nll.size or not np.isfinite(nll).all():
            raise DataError(f"the {who}'s per-passage perplexity values are malformed",
                            "measure its perplexity again", artifact=artifact)
        return nll, tokens

    ref_nll, ref_tok = arrays(reference, "reference", "dense_perplexity")
    cand_nll, cand_tok = arrays(candidate, "candidate", "perplexity")
    if not np.array_equal(ref_tok, cand_tok):
        raise DataError("the two perplexity results were measured on different passages (token counts differ)",
                        "compare models evaluated with the same evaluate.perplexity_* settings and tokenizer")
    rng = np.random.default_rng([int(seed), 0x9E3779B9])
    n, tail = ref_nll.size, (1.0 - confidence) / 2
    boot = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))                              # (r, n)
        tokens = ref_tok[idx].sum(axis=1)                                     # (r,)
        boot[start:start + size] = np.exp(cand_nll[idx].sum(axis=1) / tokens) - np.exp(ref_nll[idx].sum(axis=1) / tokens)
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    observed = float(np.exp(cand_nll.sum() / cand_tok.sum()) - np.exp(ref_nll.sum() / ref_tok.sum()))
    return PairedDifference(observed, float(low), float(high), n, confidence)


def format_interval(value: float, low: float, high: float, digits: int = 3, sign: str = "+",
                    star: bool = False) -> str:
    """``+0.031 [+0.004, +0.058]``: a value and its interval, the one text of every report and table (``sign``
    "" for a value that cannot be negative; ``star`` appends ``*``, the mark of an interval that excludes 0)."""
    f = f"{{:{sign}.{digits}f}}"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]" + ("*" if star else "")


def format_difference(d: PairedDifference, digits: int = 3) -> str:
    """``+0.031 [+0.004, +0.058]*``: the difference, its interval, and a star when the interval excludes 0."""
    return format_interval(d.diff, d.low, d.high, digits, star=d.significant)
