"""``diet-flow report``: the sweep tables rendered again, from saved tables (``sweep.csv`` with the per-item results
beside it) or straight from finished DVC experiments, with the paired comparisons computed again
(``flows.tables``) and, optionally, the latency of each timed row."""

from __future__ import annotations

import json
from pathlib import Path

from flows.experiments import DENSE_METRICS, Items, experiment_refs, finished_runs, read_items, rev_reader
from flows.points import group_order
from flows.repo import FlowError, atomic_write, read_params
from flows.comparisons import (COMPARISONS, FIDELITY, _paired_prefixes, add_paired_columns, perplexity_docs, same_items,
                               with_labels)
from flows.tables import (CSV, LATENCY, MARKDOWN, PLOT, SWEEP_DENSE, _check_same_items, _number, default_groups,
                          items_path, load_docs, plot_accuracy, render, sweep_rows, versus_markdown, write_items)


def table_tasks(table) -> list[str]:
    return sorted(c[len("acc_norm_"):] for c in table.columns if c.startswith("acc_norm_")
                  and not any(c.startswith(f"acc_norm_{k}") for k in COMPARISONS))


def load_items(root: Path, csv: Path, table) -> tuple[dict[str, Items], Items | None]:
    """The per-item results of a sweep table's rows: from the file beside it (``items_path``), else read from
    the experiments DVC still keeps (by the names in the table's ``experiment`` column)."""
    path = items_path(csv)
    if path.is_file():
        data = json.loads(path.read_text())
        return data.get("rows") or {}, data.get("dense")
    refs, items, dense = experiment_refs(root), {}, None
    tasks = table_tasks(table)
    for name in table.get("experiment", []):
        if name in refs:
            read = rev_reader(root, refs[name])
            pruned = read_items(read, tasks, "pruned")
            if pruned is not None:
                items[name] = pruned
            dense = dense or read_items(read, tasks, "dense")
    return items, dense


def add_latency(table, path: Path):
    """The table with the pruned / dense CPU-time ratios of prefill and decoding that ``benchmarks/latency.py
    --experiments`` measured for its rows' experiments (``LATENCY`` columns; empty for rows it did not time)."""
    try:
        variants = json.loads(Path(path).read_text()).get("variants") or []
    except (OSError, ValueError, AttributeError) as e:
        raise FlowError(f"cannot read latency results from {path}: {e}",
                        "pass the JSON that `python benchmarks/latency.py --experiments PATTERN --out FILE` wrote")
    timed = {v["experiment"]: v for v in variants if isinstance(v, dict) and v.get("experiment")}
    if not timed:
        raise FlowError(f"{path} times no experiment (it was not written with --experiments)",
                        "run `python benchmarks/latency.py --experiments PATTERN --out FILE` and pass that FILE")
    table = table.copy()
    for column in LATENCY:
        table[column] = [_number((timed.get(e) or {}).get(column)) for e in table.get("experiment", [])]
    return table


def report(repo: str | Path = ".", csvs: list[str | Path] | None = None, out: str | Path | None = None,
           dense: str | Path | None = None, experiments: list[str] | None = None,
           latency: str | Path | None = None, against: list[str] | None = None) -> str:
    """Render the sweep markdown and plot again from sweep tables; return the markdown.

    By default from ``results/sweep.csv`` into ``results/sweep.md`` and ``plots/accuracy_vs_sparsity.png``.
    ``csvs`` combines several sweeps' tables (e.g. one per sparsity run on different days, or one with
    ``prune.recover: bias``) and ``out`` names a folder for ``sweep.csv``, ``sweep-items.json``, ``sweep.md``
    and ``accuracy_vs_sparsity.png``. The dense reference row comes from ``dense`` (default:
    ``results/sweep-dense.json``, which a sweep writes, else ``results/dense/summary.json``); it must cover as
    many evaluation items as the rows. The paired intervals are computed again from the per-item results beside
    each table (``sweep-items.json``), or from the experiments DVC still keeps. ``experiments`` (shell-style
    name patterns) adds rows read straight from finished DVC experiments, e.g. those of a sweep whose flow
    was stopped: their metrics, params and per-item results at their commits. ``latency`` (a JSON of
    ``benchmarks/latency.py --experiments``) adds each timed row's prefill and decoding CPU time against the
    dense model's. ``against`` (row labels, e.g. ``["wanda_sp", "flap+bias"]``) adds, per label, every row's paired
    differences from that row in mean acc, flip rate, KL and perplexity (``flows.tables.versus_markdown``).
    """
    import pandas as pd

    root = Path(repo)
    paths = [Path(c) for c in csvs] if csvs else ([] if experiments else [root / CSV])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FlowError(f"no sweep table at {', '.join(missing)}", "run `diet-flow sweep` first")
    tables, items, dense_items, docs, dense_docs = [], {}, None, {}, None
    if experiments:
        runs = finished_runs(root, experiments)
        rows, items, dense_items, dense_record, docs = sweep_rows(runs, read_params(root).get("tasks") or [])
        dense_docs = perplexity_docs(dense_record)
        from diet.config import RECOVERIES
        from diet.registry import MERGE_METHODS

        methods = MERGE_METHODS.names()
        rows.sort(key=lambda r: (methods.index(r["method"]) if r["method"] in methods else len(methods),
                                 RECOVERIES.index(r["recover"]) if r["recover"] in RECOVERIES else len(RECOVERIES),
                                 group_order(r["groups"]), r["setting"]))
        tables.append(with_labels(pd.DataFrame(rows)))  # in the registry's order of methods, recovery last
    for p in paths:
        t = with_labels(pd.read_csv(p))
        tables.append(t.drop(columns=[c for c in t.columns if c.startswith(_paired_prefixes())
                                      or c in ("best_baseline", *FIDELITY)]))
        rows_items, d = load_items(root, p, t)
        items.update(rows_items)
        table_docs, table_dense_docs = load_docs(p)
        docs.update(table_docs)
        dense_docs = dense_docs or table_dense_docs
        if d is not None and dense_items is not None and not same_items(d, dense_items):
            raise FlowError(f"the dense model's per-item results beside {p} differ from another table's (other items, "
                            "another model or other answers)", "combine sweeps of the same model evaluated on the same "
                            "items (same model, evaluate.limit and evaluate.seed)")
        dense_items = dense_items or d
    table = pd.concat(tables, ignore_index=True)
    table = table.drop_duplicates(["method", "recover", "groups", "setting", "sparsity"], keep="last").sort_values("sparsity",
                                                                                              kind="stable")
    table = add_paired_columns(table, items, dense_items, default_groups(root), docs, dense_docs).drop(columns="label")
    if experiments and dense is None:
        dense, dense_path = dense_record, Path(f"experiment {runs[0]['experiment']}")
    else:
        if dense is not None:
            dense_path = Path(dense)
        else:  # the dense metrics the sweep itself used, else the workspace's
            dense_path = root / SWEEP_DENSE if (root / SWEEP_DENSE).is_file() else root / DENSE_METRICS
        if dense is not None and not dense_path.is_file():
            raise FlowError(f"no dense metrics at {dense_path}", "pass the results/dense/summary.json of a pipeline run (the report stage writes it)")
        dense = json.loads(dense_path.read_text()) if dense_path.is_file() else None
    if dense is not None:
        _check_same_items(table, dense, dense_path)
    if latency is not None:
        table = add_latency(table, Path(latency))
    md = render(table, dense)
    if against:
        md += "\n## Paired differences\n\n" + versus_markdown(table, items, dense_items, docs, list(against))
    if out is None:
        md_path, plot_path = root / MARKDOWN, root / PLOT
    else:
        out = Path(out)
        md_path, plot_path = out / "sweep.md", out / "accuracy_vs_sparsity.png"
        atomic_write(out / "sweep.csv", table.to_csv(index=False))
        kept = list(table.get("experiment", []))
        write_items(out / "sweep-items.json", {e: items[e] for e in kept if e in items}, dense_items,
                    {e: docs[e] for e in kept if e in docs}, dense_docs)
    atomic_write(md_path, md)
    plot_accuracy(table, plot_path, dense)
    return md
