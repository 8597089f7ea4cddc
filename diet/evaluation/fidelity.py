"""Fidelity to the dense model: how often, and how far, a pruned model's answers move away from the dense one's.

Accuracy cannot resolve two methods on a small model that sits near chance on several tasks: a broken model
that always picks one answer can score like a working one. Fidelity compares the pruned model with the dense
model item by item, on the same items:

* **flip**: 1 when the item's correctness differs from the dense model's (right -> wrong or wrong -> right),
  else 0; the flip rate is its mean. ``flip_norm`` is the same on the length-normalised prediction (acc_norm).
* **kl**: ``KL(p_dense || p_model)`` in nats, where ``p`` is a model's distribution over the item's choices,
  the softmax of its choice log-likelihoods (the ``lls`` of the evaluate stage); 0 for a model that ranks and
  weighs the choices exactly as the dense one does.

Each is reported per task and as the mean over tasks (each task counts once) with a 95% percentile bootstrap
interval over items (``diet.evaluation.stats``); two pruned models are compared by the paired difference of
these per-item values. Pure numpy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from diet.errors import DataError

#: the per-item fidelity measures, in the order the tables show them
MEASURES = ("flip", "flip_norm", "kl")
#: which measures are 0/1 per item (the rest are non-negative reals)
BINARY = {"flip": True, "flip_norm": True, "kl": False}


def log_softmax(lls: Sequence[float]) -> np.ndarray:
    """The log of the softmax of ``lls`` (one value per choice), computed stably."""
    x = np.asarray(lls, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise DataError(f"choice log-likelihoods must be a list of at least two finite numbers, got {list(lls)!r}",
                        "evaluate the task again: its per-item results are damaged", artifact="evaluation")
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def choice_kl(dense_lls: Sequence[float], lls: Sequence[float]) -> float:
    """``KL(p_dense || p)`` in nats between the softmax distributions over one item's choices."""
    if len(dense_lls) != len(lls):
        raise DataError(f"an item has {len(dense_lls)} choices in the dense model's results and {len(lls)} in the "
                        "pruned model's", "evaluate both models on the same task data")
    log_p, log_q = log_softmax(dense_lls), log_softmax(lls)
    return max(0.0, float(np.sum(np.exp(log_p) * (log_p - log_q))))


def item_measures(dense: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, float]:
    """``{flip, flip_norm, kl}`` of one item (evaluate-stage rows with ``acc``, ``acc_norm``, ``lls``); ``kl`` is
    left out when either row has no ``lls``."""
    out = {"flip": float(dense["acc"] != item["acc"]), "flip_norm": float(dense["acc_norm"] != item["acc_norm"])}
    if dense.get("lls") is not None and item.get("lls") is not None:
        out["kl"] = choice_kl(dense["lls"], item["lls"])
    return out


def per_item(dense: Mapping[str, Mapping], model: Mapping[str, Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {item id: {flip, flip_norm, kl}}}`` from both models' evaluate-stage results ``{task: result}``.

    The tasks and each task's item ids must match (the same evaluation items), else DataError."""
    if set(dense) != set(model):
        raise DataError(f"the dense and pruned results cover different tasks ({sorted(dense)} vs {sorted(model)})",
                        "evaluate both models on the same task list")
    out = {}
    for task in sorted(dense):
        d_rows = {str(r["id"]): r for r in dense[task].get("items") or []}
        m_rows = {str(r["id"]): r for r in model[task].get("items") or []}
        if set(d_rows) != set(m_rows) or not d_rows:
            raise DataError(f"task {task}: the dense and pruned models were evaluated on different items "
                            f"({len(d_rows)} and {len(m_rows)} items, {len(set(d_rows) ^ set(m_rows))} unpaired)",
                            "evaluate both with the same evaluate.limit and evaluate.seed")
        out[task] = {i: item_measures(d_rows[i], m_rows[i]) for i in sorted(d_rows)}
    return out


def measure(items: Mapping[str, Mapping[str, Mapping[str, float]]], name: str) -> dict[str, dict[str, float]] | None:
    """``{task: {item id: value}}`` of one measure, or None when some item lacks it (results without ``lls``)."""
    out = {}
    for task, by_id in items.items():
        if any(name not in v for v in by_id.values()):
            return None
        out[task] = {i: v[name] for i, v in by_id.items()}
    return out


def compare(name: str, values: Mapping[str, Mapping[str, float]],
            reference: Mapping[str, Mapping[str, float]] | None = None, *, seed: int = 0) -> dict:
    """``values - reference`` of measure ``name`` per task and mean over tasks, with paired 95% bootstrap intervals
    (``diet.evaluation.stats.paired_bootstrap``); ``reference`` None: the dense model, 0 on every item, so the
    result is the measure itself with its interval."""
    from diet.evaluation.stats import paired_bootstrap

    if reference is None:
        reference = {t: {i: 0.0 for i in by_id} for t, by_id in values.items()}
    return paired_bootstrap(reference, values, seed=seed, binary=BINARY[name])


def summarise(items: Mapping[str, Mapping[str, Mapping[str, float]]], *, seed: int = 0) -> dict[str, dict]:
    """Per task and mean over tasks of each measure with its 95% bootstrap interval:
    ``{measure: {task | "mean": {value, low, high, n_items}}}`` (a measure no item carries is left out)."""
    out = {}
    for name in MEASURES:
        values = measure(items, name)
        if values is not None:
            out[name] = {key: {"value": d.diff, "low": d.low, "high": d.high, "n_items": d.n_items}
                         for key, d in compare(name, values, seed=seed).items()}
    return out


def fidelity(dense: Mapping[str, Mapping], model: Mapping[str, Mapping], *, seed: int = 0) -> dict[str, dict]:
    """``summarise(per_item(dense, model))``: the pruned model's fidelity to the dense one, per task and mean."""
    return summarise(per_item(dense, model), seed=seed)
