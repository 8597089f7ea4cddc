"""Markdown tables of evaluation metrics, optionally beside the dense model's.

``metrics`` is the evaluate stage's JSON: ``{"tasks": {name: {acc, acc_norm, n, ...}}, "mean": {acc,
acc_norm}, "perplexity": float | None, "params": {...}, "latency": {...}, "checkpoint": {...},
"sparsity": float, "method": str}``. Missing entries render as ``-``.
"""

from __future__ import annotations

import math
from typing import Any

ACC_KEYS = ("acc", "acc_norm")


def mean_accuracy(tasks: dict[str, dict]) -> dict[str, float | None]:
    """Unweighted mean over tasks of acc and acc_norm (each task counts once, whatever its size)."""
    out: dict[str, float | None] = {}
    for key in ACC_KEYS:
        values = [t[key] for t in tasks.values() if _finite(t.get(key))]
        out[key] = sum(values) / len(values) if values else None
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any, digits: int = 4) -> str:
    if not _finite(x):
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def _delta(x: Any, ref: Any, digits: int = 4, percent: bool = False) -> str:
    if not (_finite(x) and _finite(ref)):
        return "-"
    if percent:
        return f"{100.0 * (x - ref) / ref:+.1f}%" if ref else "-"
    return f"{x - ref:+.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table(metrics: dict, dense: dict | None = None) -> str:
    """Accuracy per task (+ mean) and model figures; with ``dense``, its values and the deltas beside."""
    tasks = metrics.get("tasks", {})
    dense_tasks = (dense or {}).get("tasks", {})
    header = ["task", "n", "acc", "acc_norm"]
    if dense is not None:
        header += ["dense acc", "Δ acc", "dense acc_norm", "Δ acc_norm"]
    rows = []
    entries = list(tasks.items()) + [("**mean**", {**metrics.get("mean", {}), "n": None})]
    for name, m in entries:
        d = dense.get("mean", {}) if name == "**mean**" and dense is not None else dense_tasks.get(name, {})
        row = [name, _fmt(m.get("n")), _fmt(m.get("acc")), _fmt(m.get("acc_norm"))]
        if dense is not None:
            row += [_fmt(d.get("acc")), _delta(m.get("acc"), d.get("acc")),
                    _fmt(d.get("acc_norm")), _delta(m.get("acc_norm"), d.get("acc_norm"))]
        rows.append(row)
    lines = [f"### Zero-shot accuracy ({metrics.get('method', '-')}, sparsity {_fmt(metrics.get('sparsity'), 3)})",
             "", *_table(header, rows), ""]

    params, latency, ckpt = metrics.get("params", {}), metrics.get("latency", {}), metrics.get("checkpoint", {})
    figures = [
        ("perplexity (held-out)", metrics.get("perplexity"), 3),
        ("parameters, total", params.get("total"), 0),
        ("parameters, non-embedding", params.get("non_embedding"), 0),
        ("parameters, decoder layers", params.get("decoder"), 0),
        ("checkpoint size (MB)", ckpt.get("weights_mb"), 1),
        ("decode (ms / token)", latency.get("ms_per_token"), 2),
        ("prefill (ms, 256 tokens)", latency.get("prefill_ms"), 2),
    ]
    dense_params, dense_lat = (dense or {}).get("params", {}), (dense or {}).get("latency", {})
    dense_values = [(dense or {}).get("perplexity"), dense_params.get("total"), dense_params.get("non_embedding"),
                    dense_params.get("decoder"), (dense or {}).get("checkpoint", {}).get("weights_mb"),
                    dense_lat.get("ms_per_token"), dense_lat.get("prefill_ms")]
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
    return "\n".join(lines)
