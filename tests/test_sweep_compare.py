"""Sweep points with recovery and held-out tasks, and the paired comparisons of sweep and leave-one-task-out
tables (no DVC, no model: runs and per-item results are made up)."""

import json

import numpy as np
import pandas as pd
import pytest

from flows.repo import FlowError
from flows.sweep import (Point, add_paired_columns, interval_cell, items_path, parse_variant, report,
                         write_items)


def test_points_name_their_experiments_and_set_their_params():
    assert Point("vote", 0.2).name("X") == "vote-s0.2-X"
    assert Point("flap", 0.2, "bias").name("X") == "flap-bias-s0.2-X"
    assert Point("vote", 0.3, "none", held_out="boolq").name("X") == "vote-no-boolq-s0.3-X"
    assert Point("flap", 0.2, "bias").label == "flap+bias" and Point("vote", 0.2, "none").label == "vote"
    assert Point("vote", 0.2).sets() == ["-S", "prune.sparsity=0.2", "-S", "merge.method=vote"]
    assert Point("flap", 0.2, "bias").sets()[-2:] == ["-S", "prune.recover=bias"]
    held = Point("vote", 0.2, held_out="boolq").sets()
    assert held[-4:] == ["-S", "++merge.weights.boolq=0", "evaluate@boolq", "evaluate_dense@boolq"]


def test_parse_variant_refuses_unknown_methods_and_recoveries():
    assert parse_variant("vote") == ("vote", None)
    assert parse_variant("wanda_sp+bias") == ("wanda_sp", "bias")
    with pytest.raises(FlowError, match="merge method 'votes' is unknown") as e:
        parse_variant("votes")
    assert "task_agnostic" in e.value.fix
    with pytest.raises(FlowError, match="recovery 'lsq' in 'vote\\+lsq' is unknown") as e:
        parse_variant("vote+lsq")
    assert "vote+bias" in e.value.fix


def _items(correct: dict[str, np.ndarray]) -> dict:
    """Per-item results with acc = acc_norm = ``correct``."""
    return {t: {f"i{k}": [float(v), float(v)] for k, v in enumerate(arr)} for t, arr in correct.items()}


@pytest.fixture
def synthetic():
    """Five models on two tasks of 200 items. vote = task_agnostic with 40 wrong items of t1 made right
    (+0.2 on t1, +0.1 mean); flap+bias is the best field baseline."""
    rng = np.random.default_rng(0)
    base = {t: (rng.random(200) < 0.5).astype(int) for t in ("t1", "t2")}
    vote = {t: a.copy() for t, a in base.items()}
    vote["t1"][np.flatnonzero(vote["t1"] == 0)[:40]] = 1
    flap_bias = {t: a.copy() for t, a in base.items()}
    flap_bias["t2"][np.flatnonzero(flap_bias["t2"] == 0)[:10]] = 1
    wanda = {t: a.copy() for t, a in base.items()}
    wanda["t2"][np.flatnonzero(wanda["t2"] == 1)[:30]] = 0
    dense = {t: np.ones(200, dtype=int) for t in base}
    models = {"vote": vote, "task_agnostic": base, "flap+bias": flap_bias, "wanda_sp": wanda}
    rows = []
    for label, arrays in models.items():
        method, _, recover = label.partition("+")
        rows.append({"method": method, "recover": recover or "none", "sparsity": 0.2,
                     "acc": float(np.mean([a.mean() for a in arrays.values()])),
                     "acc_norm": float(np.mean([a.mean() for a in arrays.values()])),
                     **{f"acc_{t}": a.mean() for t, a in arrays.items()},
                     **{f"acc_norm_{t}": a.mean() for t, a in arrays.items()}, "experiment": f"exp-{label}"})
    return pd.DataFrame(rows), {f"exp-{k}": _items(v) for k, v in models.items()}, _items(dense)


def test_paired_columns_compare_each_row_with_task_agnostic_and_the_best_field_baseline(synthetic):
    table, items, dense = synthetic
    out = add_paired_columns(table, items, dense).set_index("label")
    vote = out.loc["vote"]
    assert vote["acc_vs_task_agnostic"] == pytest.approx(0.1)                  # 40 of 200 items on one of 2 tasks
    assert 0 < vote["acc_vs_task_agnostic_low"] < 0.1 < vote["acc_vs_task_agnostic_high"]
    assert vote["best_baseline"] == "flap+bias"
    assert vote["acc_vs_best_baseline"] == pytest.approx(0.1 - 10 / 400)
    assert vote["acc_vs_dense"] == pytest.approx(vote["acc"] - 1.0)
    assert vote["acc_vs_dense_high"] < 0                                        # far below the dense model
    assert np.isnan(out.loc["task_agnostic", "acc_vs_task_agnostic"])          # never compared with itself
    assert np.isnan(out.loc["flap+bias", "acc_vs_best_baseline"])
    assert out.loc["wanda_sp", "acc_vs_best_baseline"] == pytest.approx(-40 / 400)
    assert interval_cell(vote.to_dict(), "vs_task_agnostic").endswith("]*")    # the interval excludes zero
    # a row without per-item results gets empty cells, not a made-up interval
    partial = add_paired_columns(table, {k: v for k, v in items.items() if k != "exp-vote"}, dense).set_index("label")
    assert np.isnan(partial.loc["vote", "acc_vs_dense"]) and interval_cell(partial.loc["vote"].to_dict(), "vs_dense") == ""


def test_report_combines_a_recovery_sweep_with_its_items(tmp_path, synthetic):
    table, items, dense = synthetic
    plain = table[table["recover"] == "none"]
    bias = table[table["recover"] == "bias"]
    vote_bias = plain[plain["method"] == "vote"].assign(recover="bias", experiment="exp-vote+bias")
    plain.to_csv(tmp_path / "a.csv", index=False)
    pd.concat([bias, vote_bias]).to_csv(tmp_path / "b.csv", index=False)
    write_items(items_path(tmp_path / "a.csv"), {e: items[e] for e in plain["experiment"]}, dense)
    write_items(items_path(tmp_path / "b.csv"), {"exp-flap+bias": items["exp-flap+bias"],
                                                 "exp-vote+bias": items["exp-vote"]}, dense)
    md = report(tmp_path, csvs=[tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "out")
    combined = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert sorted(zip(combined["method"], combined["recover"])) == [
        ("flap", "bias"), ("task_agnostic", "none"), ("vote", "bias"), ("vote", "none"), ("wanda_sp", "none")]
    assert combined.set_index("experiment").loc["exp-vote+bias", "acc_vs_task_agnostic"] == pytest.approx(0.1)
    saved = json.loads((tmp_path / "out" / "sweep-items.json").read_text())
    assert set(saved["rows"]) == set(combined["experiment"]) and saved["dense"] == dense
    assert "| vote+bias |" in md and "Δ acc vs best baseline" in md and "Best field baseline at this sparsity: flap+bias" in md
    # two tables whose dense models saw other items cannot be paired
    other = {t: {i: [0.0, 0.0] for i in by_id} for t, by_id in dense.items()}
    write_items(items_path(tmp_path / "b.csv"), {}, other)
    with pytest.raises(FlowError, match="dense model's per-item results beside .*b.csv differ"):
        report(tmp_path, csvs=[tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "out2")


def test_leave_one_task_out_points_rows_and_table():
    from flows.loto import ALL, HELD_OUT, TASK_METHODS, collect, loto_points, render

    import diet.merge

    assert TASK_METHODS == diet.merge.TASK_METHODS  # flows keep their own copy: diet.merge imports torch
    points = loto_points(["vote", "task_agnostic"], ["t1", "t2"], 0.2)
    assert [(p.method, p.held_out) for p in points] == [("vote", "t1"), ("vote", "t2"), ("vote", None),
                                                         ("task_agnostic", None)]  # task_agnostic never sees a task
    with pytest.raises(FlowError, match="at least two tasks"):
        loto_points(["vote"], ["t1"], 0.2)

    def run(point, correct: dict[str, list[int]]):
        files = {}
        for t, values in correct.items():
            files[f"results/pruned/tasks/{t}.json"] = json.dumps(
                {"items": [{"id": k, "acc": v, "acc_norm": v} for k, v in enumerate(values)]})
            files[f"results/dense/tasks/{t}.json"] = json.dumps(
                {"items": [{"id": k, "acc": 1, "acc_norm": 1} for k in range(len(values))]})
        return {"point": point, "experiment": point.name("x"), "read": lambda p: files[p] if p in files else
                (_ for _ in ()).throw(FileNotFoundError(p))}

    n = 50
    good, bad, worse = [1] * 40 + [0] * 10, [1] * 20 + [0] * 30, [1] * 10 + [0] * 40
    runs = [run(points[0], {"t1": bad}), run(points[1], {"t2": bad}), run(points[2], {"t1": good, "t2": good}),
            run(points[3], {"t1": worse, "t2": worse})]
    rows, items = collect(runs, ["t1", "t2"])
    table = pd.DataFrame(rows)
    assert len(table) == 8 and set(table["calibration"]) == {ALL, HELD_OUT}
    held = table[(table["method"] == "vote") & (table["calibration"] == HELD_OUT)]
    assert held["acc"].tolist() == [20 / n, 20 / n] and held["n"].tolist() == [n, n]
    agnostic = table[table["method"] == "task_agnostic"]      # its one model stands for both calibrations
    assert sorted(agnostic["calibration"]) == [ALL, ALL, HELD_OUT, HELD_OUT] and agnostic["acc"].eq(10 / n).all()
    md = render(table, items, ["vote", "task_agnostic"], 0.2)
    assert "Δ vs task_agnostic held out" in md and "| task_agnostic (no task used) |" in md
    line = next(x for x in md.splitlines() if x.startswith("| vote (task held out) |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["0.40 / 0.40", "0.40 / 0.40", "0.4000"]
    assert cells[4].startswith("-0.600 [") and cells[4].endswith("]*")          # vs dense
    assert cells[5].startswith("-0.400 [") and cells[5].endswith("]*")          # vs vote calibrated on every task
    assert cells[6].startswith("+0.200 [") and cells[6].endswith("]*")          # vs task_agnostic
