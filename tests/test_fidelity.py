"""Fidelity to the dense model: flips and KL over the choices, on constructed cases with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from diet.errors import DataError
from diet.evaluation.fidelity import choice_kl, fidelity, per_item
from diet.evaluation.report import markdown_table, short_metrics, task_metrics


def _result(rows):
    """An evaluate-stage result: rows (id, acc, acc_norm, lls)."""
    return {"items": [{"id": i, "acc": a, "acc_norm": an, "lls": lls} for i, a, an, lls in rows]}


def test_choice_kl_has_the_closed_form_and_ignores_a_shift_of_the_log_likelihoods():
    # dense p = (1/4, 3/4), model q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert choice_kl([0.0, math.log(3)], [0.0, 0.0]) == pytest.approx(expected, rel=1e-12)
    assert choice_kl([-7.0, -7.0 + math.log(3)], [-30.0, -30.0]) == pytest.approx(expected, rel=1e-12)
    assert choice_kl([-3.0, -9.0, -1.5], [-3.0, -9.0, -1.5]) == 0.0
    assert choice_kl([-3.0, -9.0], [-9.0, -3.0]) > 5          # the ranking reversed: far from the dense model
    with pytest.raises(DataError, match="2 choices in the dense model's results and 3"):
        choice_kl([0.0, 1.0], [0.0, 1.0, 2.0])
    with pytest.raises(DataError, match="finite"):
        choice_kl([0.0, float("nan")], [0.0, 1.0])


def test_flip_rate_counts_items_whose_correctness_changed_either_way():
    dense = {"t": _result([(k, float(k < 50), float(k < 50), [0.0, -1.0]) for k in range(100)])}
    # 10 right -> wrong, 5 wrong -> right, the rest as dense; acc_norm flips on 3 items only
    rows = []
    for k in range(100):
        acc = float(k < 50)
        if k < 10:
            acc = 0.0
        elif 50 <= k < 55:
            acc = 1.0
        rows.append((k, acc, float(k < 50) if k >= 3 else 1.0 - float(k < 50), [0.0, -1.0]))
    out = fidelity(dense, {"t": _result(rows)})
    assert out["flip"]["t"]["value"] == pytest.approx(0.15)
    assert out["flip"]["mean"]["value"] == pytest.approx(0.15)
    assert out["flip_norm"]["t"]["value"] == pytest.approx(0.03)
    assert out["flip"]["t"]["low"] < 0.15 < out["flip"]["t"]["high"]
    assert out["kl"]["mean"] == {"value": 0.0, "low": 0.0, "high": 0.0, "n_items": 100}
    # the dense model against itself: nothing flips, nothing diverges
    same = fidelity(dense, dense)
    assert same["flip"]["mean"]["value"] == 0.0 and same["flip"]["mean"]["high"] == 0.0


def test_mean_over_tasks_counts_each_task_once_and_kl_is_left_out_without_log_likelihoods():
    dense = {"a": _result([(k, 1.0, 1.0, [0.0, math.log(3)]) for k in range(10)]),
             "b": _result([(k, 1.0, 1.0, [0.0, math.log(3)]) for k in range(40)])}
    model = {"a": _result([(k, 0.0 if k < 5 else 1.0, 1.0, [0.0, 0.0]) for k in range(10)]),
             "b": _result([(k, 1.0, 1.0, [0.0, math.log(3)]) for k in range(40)])}
    out = fidelity(dense, model)
    assert out["flip"]["mean"]["value"] == pytest.approx((0.5 + 0.0) / 2)     # not 5/50
    assert out["kl"]["a"]["value"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert out["kl"]["b"]["value"] == 0.0
    no_lls = {t: {"items": [{**r, "lls": None} for r in res["items"]]} for t, res in model.items()}
    assert set(fidelity(dense, no_lls)) == {"flip", "flip_norm"}


def test_results_on_other_items_are_refused():
    dense = {"t": _result([(k, 1.0, 1.0, [0.0, -1.0]) for k in range(10)])}
    with pytest.raises(DataError, match="different items"):
        per_item(dense, {"t": _result([(k, 1.0, 1.0, [0.0, -1.0]) for k in range(1, 11)])})
    with pytest.raises(DataError, match="different tasks"):
        per_item(dense, {"u": dense["t"]})


def test_the_report_shows_fidelity_in_its_table_and_metrics():
    dense = {"t": _result([(k, 1.0, 1.0, [0.0, math.log(3)]) for k in range(20)])}
    model = {"t": _result([(k, float(k >= 4), 1.0, [0.0, 0.0]) for k in range(20)])}
    record = {"tasks": {"t": {"acc": 0.8, "n": 20}}, "mean": {"acc": 0.8, "acc_norm": 1.0},
              "fidelity": fidelity(dense, model), "method": "vote", "sparsity": 0.2}
    metrics = short_metrics(record)
    assert metrics["flip"] == 0.2
    assert metrics["kl"] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-4)
    md = markdown_table(record)
    assert "### Fidelity to the dense model" in md and "| **mean** | 0.2000 [" in md
    assert "KL to dense" in md
    assert "flip" not in short_metrics({**record, "fidelity": None})
    per_task = task_metrics(record, {"tasks": {"t": {"acc": 1.0, "n": 20}}})
    assert per_task["t"]["acc"] == 0.8 and per_task["t"]["acc_dense"] == 1.0 and per_task["t"]["n"] == 20
    assert per_task["t"]["flip"] == 0.2 and per_task["t"]["kl"] == metrics["kl"]


def test_sweep_rows_carry_flip_rate_and_kl_with_paired_intervals_against_the_best_baseline():
    from flows.tables import comparison_markdown
    from flows.comparisons import add_paired_columns

    rng = np.random.default_rng(0)
    n = 200
    dense = {"t": {f"i{k}": [1.0, 1.0, [0.0, -1.0]] for k in range(n)}}
    close = {"t": {f"i{k}": [float(k >= 10), 1.0, [0.0, -1.0]] for k in range(n)}}        # 10 flips, KL 0
    far = {"t": {f"i{k}": [float(k >= 60), 1.0, [-1.0, 0.0] if k < 100 else [0.0, -1.0]]    # 60 flips
                 for k in range(n)}}
    old = {"t": {f"i{k}": [float(rng.random() < 0.9), 1.0] for k in range(n)}}            # no log-likelihoods
    rows = [{"method": m, "recover": "none", "sparsity": 0.2, "acc": 0.5, "acc_norm": 0.5, "acc_t": 0.5,
             "acc_norm_t": 0.5, "experiment": m} for m in ("vote", "wanda_sp", "random")]
    out = add_paired_columns(pd.DataFrame(rows), {"vote": close, "wanda_sp": far, "random": old},
                             dense).set_index("label")
    assert out.loc["vote", "flip"] == pytest.approx(10 / n) and out.loc["wanda_sp", "flip"] == pytest.approx(60 / n)
    # half the items with the ranking of two choices 1 nat apart reversed: KL = tanh(1/2) on each
    assert out.loc["vote", "kl"] == 0.0 and out.loc["wanda_sp", "kl"] == pytest.approx(math.tanh(0.5) / 2)
    assert out.loc["vote", "flip_vs_best_baseline"] == pytest.approx(-50 / n)
    assert out.loc["vote", "flip_vs_best_baseline_high"] < 0                  # closer beyond the interval
    assert out.loc["vote", "kl_vs_best_baseline_high"] < 0
    assert not np.isnan(out.loc["random", "flip"]) and np.isnan(out.loc["random", "kl"])
    md = comparison_markdown(out.reset_index(drop=True), None)
    assert "flip rate" in md and "Δ KL to dense vs best baseline" in md


def test_sweep_rows_carry_perplexity_differences_paired_over_passages(tmp_path):
    from flows.tables import comparison_markdown, load_docs, write_items
    from flows.comparisons import add_paired_columns

    rng = np.random.default_rng(1)
    tokens = rng.integers(40, 120, size=30).tolist()
    base = rng.uniform(2.5, 4.0, size=30)
    docs = {m: {"nll": ((base + shift) * np.asarray(tokens)).tolist(), "tokens": tokens}
            for m, shift in (("vote", 0.2), ("wanda_sp", 0.5))}
    dense_docs = {"nll": (base * np.asarray(tokens)).tolist(), "tokens": tokens}
    items = {"t": {f"i{k}": [1.0, 1.0] for k in range(20)}}
    rows = [{"method": m, "recover": "none", "sparsity": 0.2, "acc": 0.5, "acc_norm": 0.5, "acc_t": 0.5,
             "acc_norm_t": 0.5, "perplexity": 30.0, "experiment": m} for m in ("vote", "wanda_sp")]
    out = add_paired_columns(pd.DataFrame(rows), {m: items for m in docs}, items, None, docs,
                             dense_docs).set_index("label")
    assert out.loc["vote", "ppl_vs_dense"] > 0 and out.loc["vote", "ppl_vs_dense_low"] > 0
    assert out.loc["vote", "ppl_vs_best_baseline_high"] < 0          # lower than wanda_sp's beyond the interval
    assert np.isnan(out.loc["wanda_sp", "ppl_vs_best_baseline"])      # the baseline is not compared with itself
    md = comparison_markdown(out.reset_index(drop=True), None)
    assert "Δ perplexity vs best baseline" in md and "paired bootstrap over passages" in md
    write_items(tmp_path / "sweep-items.json", {}, None, docs, dense_docs)
    assert load_docs(tmp_path / "sweep.csv") == (docs, dense_docs)


def test_report_against_named_rows_gives_paired_differences_in_acc_fidelity_and_perplexity():
    from flows.repo import FlowError
    from flows.tables import versus_markdown

    n, tokens = 200, [50] * 20
    dense = {"t": {f"i{k}": [1.0, 1.0, [0.0, -1.0]] for k in range(n)}}
    close = {"t": {f"i{k}": [float(k >= 10), 1.0, [0.0, -1.0]] for k in range(n)}}
    far = {"t": {f"i{k}": [float(k >= 60), 1.0, [-1.0, 0.0] if k < 100 else [0.0, -1.0]] for k in range(n)}}
    docs = {"vote": {"nll": [150.0] * 20, "tokens": tokens},
            "wanda_sp": {"nll": [150.0 + (k % 3) * 10 + 20 for k in range(20)], "tokens": tokens}}
    rows = [{"method": m, "recover": "none", "sparsity": 0.2, "acc": 0.5, "acc_norm": 0.5, "experiment": m}
            for m in ("vote", "wanda_sp")]
    md = versus_markdown(pd.DataFrame(rows), {"vote": close, "wanda_sp": far}, dense, docs, ["wanda_sp"])
    line = next(r for r in md.splitlines() if r.startswith("| vote |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1].startswith("+0.250 [") and cells[1].endswith("*")        # 50 fewer wrong items of 200
    assert cells[2].startswith("-0.250 [") and cells[2].endswith("*")        # and 50 fewer flips
    assert cells[3].startswith("-") and cells[3].endswith("*") and cells[4].startswith("-") and cells[4].endswith("*")
    assert "| wanda_sp |" not in md                                          # the reference is not compared with itself
    with pytest.raises(FlowError, match="no row of the table is labelled so"):
        versus_markdown(pd.DataFrame(rows), {}, dense, docs, ["flap+bias"])
