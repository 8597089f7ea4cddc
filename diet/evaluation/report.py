"""One model's evaluation record, the short metrics ``dvc metrics show`` prints, and markdown tables.

``record`` (``model_record``) gathers the per-task evaluations and the model figures of one model:
``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "mean": {acc, acc_norm}, "perplexity":
float | None, "params": {...}, "checkpoint": {...}, "sparsity": float, "method": str}``. ``short_metrics``
keeps the few figures worth a column; ``markdown_table`` renders a record beside the dense one. Missing
entries render as ``-``.
"""

from __future__ import annotations

import dataclasses

import math
from typing import Any

from diet import markdown
from diet.evaluation.stats import DEFAULT_RESAMPLES as RESAMPLES
from diet.evaluation.stats import format_interval

ACC_KEYS = ("acc", "acc_norm")


def mean_accuracy(tasks: dict[str, dict]) -> dict[str, float | None]:
    """Unweighted mean over tasks of acc and acc_norm (each task counts once, whatever its size)."""
    out: dict[str, float | None] = {}
    for key in ACC_KEYS:
        values = [t[key] for t in tasks.values() if _finite(t.get(key))]
        out[key] = sum(values) / len(values) if values else None
    return out


TASK_KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")


def model_record(task_results: dict[str, dict], model_stats: dict, *, method: str,
                 sparsity: float | None = None, backend: str | None = None, mask: dict | None = None) -> dict:
    """The whole evaluation of one model: per-task figures (no per-item rows), their mean, and model figures.

    ``task_results`` maps task -> the evaluate stage's JSON; ``model_stats`` is the perplexity stage's JSON.
    """
    tasks = {name: {k: r.get(k) for k in TASK_KEYS} for name, r in task_results.items()}
    ppl = model_stats.get("perplexity") or {}
    params = model_stats.get("params") or {}
    return {"tasks": tasks, "mean": mean_accuracy(tasks), "perplexity": ppl.get("ppl"),
            "perplexity_detail": ppl or None, "params": {k: v for k, v in params.items() if k != "per_layer"},
            "params_per_layer": params.get("per_layer"), "checkpoint": model_stats.get("checkpoint"),
            "sparsity": 0.0 if sparsity is None else float(sparsity), "method": method, "backend": backend,
            "mask": mask}


def paired_differences(reference: dict[str, dict], candidate: dict[str, dict], *, seed: int = 0) -> dict:
    """``candidate - reference`` accuracy per task and for the mean over tasks, with paired 95% bootstrap
    intervals (``diet.evaluation.stats``), from the evaluate stage's per-item results of both models:
    ``{metric: {task | "mean": {diff, low, high, significant, n_items}}}``."""
    from diet.evaluation.stats import compare_metrics

    def items(results: dict[str, dict]) -> dict[str, dict]:
        return {t: {str(r["id"]): {k: r[k] for k in ACC_KEYS} for r in res["items"]} for t, res in results.items()}

    compared = compare_metrics(items(reference), items(candidate), metrics=ACC_KEYS, seed=seed)
    return {metric: {name: {"diff": d.diff, "low": d.low, "high": d.high, "significant": d.significant,
                            "n_items": d.n_items} for name, d in by_task.items()}
            for metric, by_task in compared.items()}


def perplexity_vs(reference: dict, candidate: dict, *, seed: int = 0) -> dict | None:
    """``candidate - reference`` perplexity with its paired bootstrap interval over passages
    (``stats.perplexity_difference``) as ``{diff, low, high, n_items, confidence, significant}``; None when either
    record has no per-passage values (perplexity skipped, or a result written before they were kept)."""
    from diet.evaluation.stats import perplexity_difference

    ref, cand = (((r.get("perplexity_detail") or {}).get("per_doc")) for r in (reference, candidate))
    if not ref or not cand:
        return None
    return dataclasses.asdict(perplexity_difference(ref, cand, seed=seed))


def task_metrics(pruned: dict, dense: dict) -> dict:
    """Per task, the figures ``dvc metrics show`` / ``dvc metrics diff`` print from the second metrics file:
    the pruned and the dense model's acc, the flip rate and KL to the dense model, and the number of items."""
    fidelity = pruned.get("fidelity") or {}
    out = {}
    for task, r in pruned["tasks"].items():
        row = {"acc": round(float(r["acc"]), 4), "acc_dense": round(float(dense["tasks"][task]["acc"]), 4)}
        for name in ("flip", "kl"):
            value = (fidelity.get(name) or {}).get(task, {}).get("value")
            if _finite(value):
                row[name] = round(float(value), 4)
        row["n"] = int(r.get("n", 0))
        out[task] = row
    return out


def short_metrics(record: dict) -> dict:
    """The figures ``dvc metrics show`` prints as columns: mean acc / acc_norm, perplexity, size, sparsity, and
    for a pruned model its fidelity to the dense one (mean flip rate and KL over tasks, when recorded)."""
    params = record.get("params") or {}

    def rounded(x: Any, digits: int) -> Any:
        return round(float(x), digits) if _finite(x) else None

    out = {"acc": rounded(record["mean"].get("acc"), 4), "acc_norm": rounded(record["mean"].get("acc_norm"), 4),
           "perplexity": rounded(record.get("perplexity"), 3),
           "params_M": rounded(params.get("total", float("nan")) / 1e6, 2),
           "decoder_M": rounded(params.get("decoder", float("nan")) / 1e6, 2),
           "sparsity": rounded(record.get("sparsity"), 4)}
    fidelity = record.get("fidelity") or {}
    for name in ("flip", "kl"):
        if name in fidelity:
            out[name] = rounded(fidelity[name]["mean"]["value"], 4)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any, digits: int = 4) -> str:
    if not _finite(x):
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def _pm(x: Any, stderr: Any) -> str:
    """``0.4500 ± 0.0250`` (value and standard error), or the value alone when no error is known."""
    return f"{_fmt(x)} ± {stderr:.4f}" if _finite(x) and _finite(stderr) else _fmt(x)


def _interval(value: Any, low: Any, high: Any, digits: int = 4, sign: str = "+") -> str:
    """``+0.0310 [+0.0040, +0.0580]``: a value and its 95% interval (``sign`` "" for a value that cannot be
    negative), ``-`` when any is unknown."""
    if not all(_finite(x) for x in (value, low, high)):
        return "-"
    return format_interval(value, low, high, digits, sign)


def _paired(diffs: dict | None, metric: str, name: str) -> str | None:
    """``+0.031 [+0.004, +0.058]*`` from a ``paired_differences`` entry (star: the interval excludes zero)."""
    d = ((diffs or {}).get(metric) or {}).get(name)
    if d is None:
        return None
    return _interval(d["diff"], d["low"], d["high"]) + ("*" if d["significant"] else "")


def _delta(x: Any, ref: Any, digits: int = 4, percent: bool = False) -> str:
    if not (_finite(x) and _finite(ref)):
        return "-"
    if percent:
        return f"{100.0 * (x - ref) / ref:+.1f}%" if ref else "-"
    return f"{x - ref:+.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return markdown.table(header, rows)


def markdown_table(metrics: dict, dense: dict | None = None) -> str:
    """Accuracy per task (+ mean) and model figures; with ``dense``, its values and the deltas beside."""
    tasks = metrics.get("tasks", {})
    dense_tasks = (dense or {}).get("tasks", {})
    header = ["task", "n", "acc", "acc_norm"]
    if dense is not None:
        header += ["dense acc", "Δ acc [95% CI]", "dense acc_norm", "Δ acc_norm [95% CI]"]
    rows = []
    entries = list(tasks.items()) + [("**mean**", {**metrics.get("mean", {}), "n": None})]
    for name, m in entries:
        d = dense.get("mean", {}) if name == "**mean**" and dense is not None else dense_tasks.get(name, {})
        row = [name, _fmt(m.get("n")), _pm(m.get("acc"), m.get("acc_stderr")),
               _pm(m.get("acc_norm"), m.get("acc_norm_stderr"))]
        if dense is not None:
            key = "mean" if name == "**mean**" else name
            paired = metrics.get("vs_dense")
            row += [_fmt(d.get("acc")), _paired(paired, "acc", key) or _delta(m.get("acc"), d.get("acc")),
                    _fmt(d.get("acc_norm")),
                    _paired(paired, "acc_norm", key) or _delta(m.get("acc_norm"), d.get("acc_norm"))]
        rows.append(row)
    lines = [f"### Zero-shot accuracy ({metrics.get('method', '-')}, sparsity {_fmt(metrics.get('sparsity'), 3)})",
             "", *_table(header, rows), ""]
    if metrics.get("vs_dense"):
        lines += ["Accuracy ± its standard error. Δ: this model minus the dense one on the same items, with the "
                  f"95% interval of a paired bootstrap over items ({RESAMPLES:,} resamples); * marks an interval that "
                  "excludes zero.", ""]

    lines += fidelity_table(metrics.get("fidelity"))

    params, ckpt = metrics.get("params") or {}, metrics.get("checkpoint") or {}
    figures = [
        ("perplexity (held-out)", metrics.get("perplexity"), 3),
        ("parameters, total", params.get("total"), 0),
        ("parameters, non-embedding", params.get("non_embedding"), 0),
        ("parameters, decoder layers", params.get("decoder"), 0),
        ("checkpoint size (MB)", ckpt.get("weights_mb"), 1),
    ]
    dense_params = (dense or {}).get("params") or {}
    dense_values = [(dense or {}).get("perplexity"), dense_params.get("total"), dense_params.get("non_embedding"),
                    dense_params.get("decoder"), ((dense or {}).get("checkpoint") or {}).get("weights_mb")]
    header = ["figure", "value"] + (["dense", "change"] if dense is not None else [])
    rows = []
    for (label, value, digits), ref in zip(figures, dense_values):
        value = int(value) if digits == 0 and _finite(value) else value
        row = [label, _fmt(value, digits)]
        if dense is not None:
            ref = int(ref) if digits == 0 and _finite(ref) else ref
            row += [_fmt(ref, digits), _delta(value, ref, percent=True)]
        rows.append(row)
    lines += ["### Model", "", *_table(header, rows), ""]
    ppl = metrics.get("perplexity_vs_dense")
    if ppl:
        lines += [f"Perplexity minus the dense model's: {_interval(ppl['diff'], ppl['low'], ppl['high'], 2)}"
                  f"{'*' if ppl['significant'] else ''} (95% interval of a paired bootstrap over the "
                  f"{ppl['n_items']} passages, {RESAMPLES:,} resamples).", ""]
    return "\n".join(lines)


FIDELITY_HEADS = {"flip": "flip rate (acc) [95% CI]", "flip_norm": "flip rate (acc_norm) [95% CI]",
                  "kl": "KL to dense, nats [95% CI]"}


def fidelity_table(fidelity: dict | None) -> list[str]:
    """Markdown lines of a pruned model's fidelity to the dense model (``diet.evaluation.fidelity``): per task and
    mean, the flip rates and the KL over the choices with their intervals; nothing when not recorded."""
    if not fidelity:
        return []
    names = [m for m in FIDELITY_HEADS if m in fidelity]
    keys = [k for k in next(iter(fidelity.values())) if k != "mean"] + ["mean"]
    rows = [["**mean**" if key == "mean" else key,
             *(_interval(*(fidelity[m][key][x] for x in ("value", "low", "high")), sign="") for m in names)]
            for key in keys]
    return ["### Fidelity to the dense model", "", *_table(["task", *(FIDELITY_HEADS[m] for m in names)], rows), "",
            "Flip rate: the share of items whose correctness differs from the dense model's. KL: the divergence of "
            "the model's distribution over each item's choices (softmax of the choice log-likelihoods) from the "
            f"dense model's, mean over items. 95% interval of a bootstrap over items ({RESAMPLES:,} resamples); the mean "
            "is over tasks, each counting once. Lower is closer to the dense model.", ""]
