"""Sweep tables: one row per experiment with its paired comparisons (accuracy, fidelity, perplexity) against the
dense model, the task-agnostic mask and the best field baseline, as CSV, markdown and plot; ``report`` renders
them again from saved tables or finished experiments (``flows.sweep``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diet import markdown
from flows.experiments import DENSE_METRICS, PRUNED_METRICS, Items, fidelity_values, params_at, read_items
from flows.comparisons import (COMPARISONS, FIDELITY, PPL_COMPARISONS, _paired_prefixes, add_paired_columns,
                               paired_fidelity, paired_mean, paired_perplexity, perplexity_docs, same_items, with_labels)
from flows.points import setting_text
from flows.repo import FlowError, atomic_write, read_params

CSV, MARKDOWN, PLOT = "results/sweep.csv", "results/sweep.md", "plots/accuracy_vs_sparsity.png"
SWEEP_DENSE = "results/sweep-dense.json"  # the dense metrics of the sweep's own evaluation settings
SWEEP_ITEMS = "results/sweep-items.json"  # per-item results of every row and of the dense model


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def metrics_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The sweep columns of one evaluation's metrics: mean and per-task accuracy, size, perplexity."""
    mean = metrics.get("mean") or {}
    params = metrics.get("params") or {}
    row: dict[str, Any] = {
        "achieved_sparsity": _number(metrics.get("sparsity")),
        "acc": _number(mean.get("acc")),
        "acc_norm": _number(mean.get("acc_norm")),
        "perplexity": _number(metrics.get("perplexity")),
    }
    for name, value in params.items():
        if _number(value) is not None:
            row[f"params_{name}"] = int(value)
    tasks = metrics.get("tasks") or {}
    if tasks and all(isinstance(t.get("n"), int) for t in tasks.values()):
        row["eval_items"] = sum(t["n"] for t in tasks.values())
    for name, t in sorted(tasks.items()):
        row[f"acc_{name}"] = _number(t.get("acc"))
        row[f"acc_norm_{name}"] = _number(t.get("acc_norm"))
    return row


def _check_same_items(table, dense: dict[str, Any], dense_path: Path) -> None:
    """Refuse a dense reference evaluated on another number of items than the sweep's rows."""
    if "eval_items" not in table.columns or table["eval_items"].isna().all():
        return                                  # tables written before eval_items was recorded
    dense_items = metrics_row(dense).get("eval_items")
    sweep_items = sorted({int(n) for n in table["eval_items"].dropna()})
    if dense_items is not None and sweep_items != [dense_items]:
        raise FlowError(f"the dense metrics in {dense_path} cover {dense_items} evaluation items, the sweep rows "
                        f"{', '.join(map(str, sweep_items))}: the comparison would mix evaluation sizes",
                        "pass --dense with the dense metrics of the sweep's evaluate.limit, or rerun the sweep")




def sweep_row(run: dict[str, Any], tasks: list[str]) -> tuple[dict[str, Any], Items | None, Items | None]:
    """One sweep row (its metrics), the pruned model's per-item results and the dense model's."""
    read, point = run["read"], run["point"]
    try:
        metrics = json.loads(read(PRUNED_METRICS))
    except FileNotFoundError:
        raise FlowError(f"experiment {run['experiment']} recorded no {PRUNED_METRICS}",
                        "check dvc.yaml: the report stage must write it as an output") from None
    prune = params_at(read).get("prune") or {}
    row = {"method": point.method, "recover": prune.get("recover") or "none",
           "groups": "+".join(prune.get("groups") or ()), "setting": setting_text(point.setting),
           "sparsity": point.sparsity, **metrics_row(metrics), "experiment": run["experiment"]}
    return row, read_items(read, tasks, "pruned"), read_items(read, tasks, "dense")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return "\n".join(markdown.table(columns, ([cell(r.get(c)) for c in columns] for r in rows))) + "\n"


def accuracy_table(table, dense: dict[str, Any] | None):
    """Mean accuracy with one column per row label and a row per sparsity (the dense model as sparsity 0 when
    known): the data of ``accuracy_vs_sparsity.csv``, which ``dvc plots show`` draws as one line per method."""
    table = with_labels(table)
    wide = table.pivot_table(index="sparsity", columns="label", values="acc", sort=False)
    wide = wide[list(dict.fromkeys(table["label"]))].sort_index()
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None and 0.0 not in wide.index:
        wide.loc[0.0] = dense_acc
        wide = wide.sort_index()
    wide.columns.name = None
    return wide.reset_index()


def plot_accuracy(table, path: Path, dense: dict[str, Any] | None) -> None:
    """Mean accuracy against requested sparsity, one line per method; the dense model as a reference.
    Writes the plot's data beside it (same name, ``.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, g in with_labels(table).groupby("label", sort=False):
        g = g.sort_values("sparsity")
        ax.plot(g["sparsity"], g["acc"], marker="o", label=f"{label} acc")
        if g["acc_norm"].notna().any():
            ax.plot(g["sparsity"], g["acc_norm"], marker="x", linestyle="--", label=f"{label} acc_norm")
    dense_acc = _number(((dense or {}).get("mean") or {}).get("acc"))
    if dense_acc is not None:
        ax.axhline(dense_acc, color="grey", linestyle=":", label="dense acc")
    ax.set_xlabel("sparsity (share of decoder parameters removed)")
    ax.set_ylabel("mean zero-shot accuracy")
    ax.set_title("DIET: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    atomic_write(path.with_suffix(".csv"), accuracy_table(table, dense).to_csv(index=False))


# -- paired comparisons --------------------------------------------------------------------------------------------
#: the comparisons of every row: column prefix -> what the row is compared with
def interval_cell(r: dict[str, Any], key: str, metric: str = "acc", sign: str = "+", star: bool = True,
                  digits: int = 3) -> str:
    """``+0.031 [+0.004, +0.058]*`` from a row's paired columns ``<metric>_<key>`` (star: the interval excludes
    zero), or ''. ``sign=""`` and ``star=False`` for a value that cannot be negative (a flip rate)."""
    from diet.evaluation.stats import format_interval

    d, lo, hi = (r.get(f"{metric}_{key}{s}") for s in ("", "_low", "_high"))
    if any(_number(v) is None or math.isnan(v) for v in (d, lo, hi)):
        return ""
    return format_interval(d, lo, hi, digits, sign, star=star and (lo > 0 or hi < 0))


def comparison_markdown(table, dense: dict[str, Any] | None) -> str:
    """One table per sparsity: a row per method (the dense model first), "acc / acc_norm" per task, the means,
    perplexity and the paired differences in mean acc (when the table has them). ``table`` is the sweep table."""
    from diet.evaluation.stats import DEFAULT_RESAMPLES as RESAMPLES

    table = with_labels(table)
    tasks = sorted(c[len("acc_"):] for c in table.columns if c.startswith("acc_") and not c.startswith("acc_norm")
                   and c != "acc_norm" and not any(c.startswith(f"acc_{k}") for k in COMPARISONS))
    paired = [k for k in COMPARISONS if f"acc_{k}" in table.columns and table[f"acc_{k}"].notna().any()]
    heads = {"vs_dense": "Δ acc vs dense", "vs_task_agnostic": "Δ acc vs task_agnostic",
             "vs_best_baseline": "Δ acc vs best baseline", "vs_default": "Δ acc vs default"}
    # fidelity: the row's flip rate and KL with their intervals, and their differences from the best baseline
    faithful = [m for m in FIDELITY if f"{m}_vs_dense" in table.columns and table[f"{m}_vs_dense"].notna().any()]
    fidelity_heads = {"flip": "flip rate", "kl": "KL to dense"}
    versus = [m for m in faithful if table[f"{m}_vs_best_baseline"].notna().any()]
    ppl = [k for k in PPL_COMPARISONS if f"ppl_{k}" in table.columns and table[f"ppl_{k}"].notna().any()]
    ppl_heads = {"vs_dense": "Δ perplexity vs dense", "vs_best_baseline": "Δ perplexity vs best baseline"}
    # rows that prune different groups differ in size: their total parameters (embedding included) are shown
    sizes = table["groups"].nunique() > 1 and "params_total" in table.columns
    timed = all(c in table.columns for c in LATENCY) and table[list(LATENCY)].notna().any().any()
    head = ["method", *tasks, "mean acc", "mean acc_norm", "perplexity", *(fidelity_heads[m] for m in faithful),
            *(["total params (M)"] if sizes else []), *(["prefill / decode CPU time (× dense)"] if timed else []),
            *(heads[k] for k in paired), *(f"Δ {fidelity_heads[m]} vs best baseline" for m in versus),
            *(ppl_heads[k] for k in ppl)]

    def ratios(r: dict[str, Any]) -> str:
        values = [_number(r.get(c)) for c in LATENCY]
        return " / ".join(f"{v:.2f}" for v in values) if all(v is not None and not math.isnan(v) for v in values) \
            else ""

    def pair(a: Any, b: Any) -> str:
        ok = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))  # noqa: E731
        return f"{a:.2f} / {b:.2f}" if ok(a) and ok(b) else (f"{a:.2f}" if ok(a) else "")

    def line(name: str, r: dict[str, Any]) -> str:
        cells = [name, *(pair(r.get(f"acc_{t}"), r.get(f"acc_norm_{t}")) for t in tasks),
                 *(f"{r[k]:.4f}" if isinstance(r.get(k), float) and not math.isnan(r[k]) else ""
                   for k in ("acc", "acc_norm")),
                 f"{r['perplexity']:.2f}" if isinstance(r.get("perplexity"), float) else "",
                 *(interval_cell(r, "vs_dense", m, sign="", star=False) for m in faithful),
                 *([f"{r['params_total'] / 1e6:.1f}" if _number(r.get("params_total")) is not None
                    and not math.isnan(r["params_total"]) else ""] if sizes else []),
                 *([ratios(r)] if timed else []), *(interval_cell(r, k) for k in paired),
                 *(interval_cell(r, "vs_best_baseline", m) for m in versus),
                 *(interval_cell(r, k, "ppl", digits=2) for k in ppl)]
        return markdown.row(cells)

    out = []
    dense_row = metrics_row(dense) if dense else None
    for sparsity, group in table.groupby("sparsity", sort=True):
        out += [f"**Sparsity {sparsity:g}** (share of decoder-layer parameters removed); cells are acc / acc_norm",
                "", *markdown.head(head)]
        if dense_row:
            zero = {f"{m}_vs_dense{x}": 0.0 for m in faithful for x in ("", "_low", "_high")}
            out.append(line("dense", {**dense_row, **{c: 1.0 for c in LATENCY}, **zero}))
        out += [line(str(r["label"]), r) for r in group.to_dict("records")]
        out.append("")
        best = sorted({b for b in group.get("best_baseline", []) if isinstance(b, str) and b})
        if paired:
            out += ["Δ: the row's mean acc over tasks minus the reference's, on the same items, with the 95% interval "
                    f"of a paired bootstrap over items ({RESAMPLES:,} resamples, seed 0); * marks an interval that excludes "
                    "zero." + (f" Best field baseline at this sparsity: {', '.join(best)}." if best else ""), ""]
        if faithful:
            out += ["Fidelity to the dense model, mean over tasks: flip rate, the share of items whose correctness "
                    "differs from the dense model's; KL, the divergence (nats) of the distribution over each item's "
                    "choices from the dense model's. Lower is closer; each with its 95% bootstrap interval over "
                    "items, and Δ the paired difference from the best field baseline (negative: closer).", ""]
        if ppl:
            out += ["Δ perplexity: the row's perplexity on the held-out passages minus the reference's, with the 95% "
                    "interval of a paired bootstrap over passages.", ""]
    return "\n".join(out)


def render(table, dense: dict[str, Any] | None) -> str:
    """The sweep's markdown: the summary table, the dense model's figures, and the per-task tables."""
    summary = with_labels(table)
    columns = ["label"] + [c for c in summary.columns if not c.startswith("acc_norm_") and c not in
                           ("label", "method", "recover", "setting", *LATENCY)
                           and not c.startswith(_paired_prefixes())]
    md = "# DIET sweep\n\n" + markdown_table(summary.to_dict("records"), columns)
    if dense:
        md += "\nDense model: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics_row(dense).items()
                                             if k in ("acc", "acc_norm", "perplexity") and v is not None) + "\n"
    return md + "\n## Per task\n\n" + comparison_markdown(table, dense)


def versus_markdown(table, items: dict[str, Items], dense_items: Items | None, docs: dict[str, dict] | None,
                    labels: list[str]) -> str:
    """Per sparsity, every row's paired differences from each row named in ``labels`` (e.g. ``wanda_sp``,
    ``flap+bias``): mean acc, flip rate, KL to dense and perplexity, each with its 95% interval (over items; over
    passages for perplexity). Refuses a label no row has."""
    from diet.evaluation.stats import format_difference

    table = with_labels(table)
    missing = [lab for lab in labels if lab not in set(table["label"])]
    if missing:
        raise FlowError(f"--against {', '.join(missing)}: no row of the table is labelled so",
                        f"name rows the table has: {', '.join(sorted(set(table['label'])))}")
    fidelity = {e: fidelity_values(dense_items, cand) for e, cand in items.items()} if dense_items else {}
    out = []
    for sparsity, group in table.groupby("sparsity", sort=True):
        for lab in labels:
            ref = group[group["label"] == lab]
            if not len(ref):
                continue
            ref_exp = ref.iloc[0].get("experiment")
            head = ["method", "Δ mean acc", "Δ flip rate", "Δ KL to dense", "Δ perplexity"]
            out += [f"**Against {lab}** (sparsity {sparsity:g}): the row minus {lab}, paired, 95% intervals; * "
                    "excludes zero", "", *markdown.head(head)]
            for r in group.to_dict("records"):
                exp = r.get("experiment")
                if exp == ref_exp or exp not in items or ref_exp not in items:
                    continue
                cells = [str(r["label"]), format_difference(paired_mean(items[ref_exp], items[exp]))]
                for name in FIDELITY:
                    mine, theirs = fidelity.get(exp) or {}, fidelity.get(ref_exp) or {}
                    ok = name in mine and name in theirs
                    cells.append(format_difference(paired_fidelity(theirs, mine, name)) if ok else "")
                d = paired_perplexity((docs or {}).get(ref_exp), (docs or {}).get(exp)) \
                    if (docs or {}).get(ref_exp) and (docs or {}).get(exp) else None
                cells.append(format_difference(d, 2) if d is not None else "")
                out.append(markdown.row(cells))
            out.append("")
    return "\n".join(out)


def items_path(csv: Path) -> Path:
    """Where a sweep table's per-item results lie: ``sweep.csv`` -> ``sweep-items.json``."""
    return csv.with_name(f"{csv.stem}-items.json")


def write_items(path: Path, rows: dict[str, Items], dense: Items | None, docs: dict[str, dict] | None = None,
                dense_docs: dict | None = None) -> None:
    """The per-item results of a table's rows and of the dense model, with (``perplexity``) their per-passage
    perplexity values where known."""
    data = {"dense": dense, "rows": rows}
    if docs or dense_docs:
        data["perplexity"] = {"rows": docs or {}, "dense": dense_docs}
    atomic_write(path, json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def load_docs(csv: Path) -> tuple[dict[str, dict], dict | None]:
    """The per-passage perplexity values beside a sweep table (``write_items``): (by experiment, the dense model's)."""
    path = items_path(csv)
    data = (json.loads(path.read_text()).get("perplexity") or {}) if path.is_file() else {}
    return data.get("rows") or {}, data.get("dense")


def default_groups(root: Path) -> str | None:
    """The workspace's ``prune.groups``, ``+``-joined (the groups a ``--groups`` row is compared with), or None."""
    try:
        groups = (read_params(root).get("prune") or {}).get("groups")
    except FlowError:
        return None
    return "+".join(groups) if groups else None


def sweep_rows(runs: list[dict[str, Any]], tasks: list[str]):
    """The rows of ``runs`` (``sweep_row``), their per-item results by experiment, the dense model's per-item
    results, its summary (the first the runs recorded, or None) and the rows' per-passage perplexity values by
    experiment (``perplexity_docs``). Runs whose dense models' per-item results
    differ (other items, another model or other answers; ``flows.comparisons.same_items``) are refused: their rows could not be paired."""
    rows, items, dense_items, dense, dense_from, docs = [], {}, None, None, None, {}
    for run in runs:
        row, pruned, dense_run = sweep_row(run, tasks)
        rows.append(row)
        mine = perplexity_docs(json.loads(run["read"](PRUNED_METRICS)))
        if mine:
            docs[row["experiment"]] = mine
        if pruned is not None:
            items[row["experiment"]] = pruned
        if dense_items is not None and dense_run is not None and not same_items(dense_run, dense_items):
            raise FlowError(f"the dense model's per-item results of experiment {run['experiment']} differ from "
                            f"those of {dense_from}: their rows cannot be paired",
                            "combine experiments evaluated on the same items (same evaluate.limit, evaluate.seed "
                            "and tasks)")
        if dense_items is None and dense_run is not None:
            dense_items, dense_from = dense_run, run["experiment"]
        if dense is None:
            try:
                dense = json.loads(run["read"](DENSE_METRICS))
            except FileNotFoundError:
                pass
    return rows, items, dense_items, dense, docs


def write_results(root: Path, runs: list[dict[str, Any]], tasks: list[str]):
    """The sweep table as CSV, markdown and plot under ``root``, and the per-item results beside the CSV;
    returns the table, the markdown and the paths."""
    import pandas as pd

    rows, items, dense_items, dense, docs = sweep_rows(runs, tasks)
    table = add_paired_columns(pd.DataFrame(rows), items, dense_items, default_groups(root), docs,
                               perplexity_docs(dense)).drop(columns="label")
    atomic_write(root / CSV, table.to_csv(index=False))
    write_items(items_path(root / CSV), items, dense_items, docs, perplexity_docs(dense))
    if dense is not None:
        atomic_write(root / SWEEP_DENSE, json.dumps(dense, indent=2, sort_keys=True) + "\n")
    md = render(table, dense)
    atomic_write(root / MARKDOWN, md)
    plot_accuracy(table, root / PLOT, dense)
    return table, md, [root / CSV, root / MARKDOWN, root / PLOT, items_path(root / CSV)]


#: the latency columns a report takes from ``benchmarks/latency.py --experiments`` (CPU time, pruned / dense)
LATENCY = ("prefill_cpu_ratio", "decode_cpu_ratio")
