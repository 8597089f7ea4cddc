"""Sweep points with recovery and held-out tasks, and the paired comparisons of sweep and leave-one-task-out
tables (no DVC, no model: runs and per-item results are made up)."""

import json

import numpy as np
import pandas as pd
import pytest

from flows.repo import FlowError
from flows.experiments import inferred_settings
from flows.points import Point, check_points, make_points, parse_groups, parse_setting, parse_variant
from flows.sweep_report import report
from flows.tables import comparison_markdown, interval_cell, items_path, write_items
from flows.comparisons import add_paired_columns, with_labels


def test_points_name_their_experiments_and_set_their_params():
    assert Point("vote", 0.2).name("X") == "vote-s0.2-X"
    assert Point("flap", 0.2, "bias").name("X") == "flap-bias-s0.2-X"
    assert Point("vote", 0.3, "none", held_out="boolq").name("X") == "vote-no-boolq-s0.3-X"
    assert Point("flap", 0.2, "bias").label == "flap+bias" and Point("vote", 0.2, "none").label == "vote"
    assert Point("vote", 0.2).sets() == ["-S", "prune.sparsity=0.2", "-S", "merge.method=vote"]
    assert Point("flap", 0.2, "bias").sets()[-2:] == ["-S", "prune.recover=bias"]
    held = Point("vote", 0.2, held_out="boolq").sets()
    assert held[-4:] == ["-S", "++merge.weights.boolq=0", "evaluate@boolq", "evaluate_dense@boolq"]


def test_points_prune_the_groups_they_name():
    p = Point("vote", 0.2, groups=("mlp", "hidden"))
    assert p.name("X") == "vote-mlp_hidden-s0.2-X" and p.label == "vote [mlp+hidden]"
    assert p.sets()[-2:] == ["-S", "prune.groups=[mlp,hidden]"]
    assert Point("vote", 0.2).label == "vote"                               # None: params.yaml's groups
    points = make_points([0.2, 0.3], ["vote", "flap+bias"], ["mlp", "attention+hidden"])
    assert [(p.method, p.recover, p.groups, p.sparsity) for p in points[:3]] == [
        ("vote", None, ("mlp",), 0.2), ("vote", None, ("mlp",), 0.3), ("vote", None, ("attention", "hidden"), 0.2)]
    assert len(points) == 8 and make_points([0.2], ["vote"])[0].groups is None
    assert parse_groups("mlp + hidden") == ("mlp", "hidden")
    with pytest.raises(FlowError, match="group 'heads' in 'mlp\\+heads' is unknown") as e:
        parse_groups("mlp+heads")
    assert "mlp, attention, hidden" in e.value.fix
    with pytest.raises(FlowError, match="names a group twice"):
        parse_groups("mlp+mlp")
    with pytest.raises(FlowError, match="combinations repeat"):
        make_points([0.2], ["vote"], ["mlp+hidden", "mlp+hidden"])


def test_ablation_points_change_one_setting_each():
    points = make_points([0.2], ["vote"], None, ["score.statistic=l2", "select.min_keep={mlp: 0.1}"])
    assert [p.label for p in points] == ["vote", "vote score.statistic=l2", "vote select.min_keep={mlp: 0.1}"]
    assert points[1].sets()[-2:] == ["-S", "score.statistic=l2"] and points[1].name("X") == \
        "vote-score.statistic_l2-s0.2-X"
    assert points[2].sets()[-1] == "select.min_keep={mlp: 0.1}"
    assert parse_setting("score.weight_norm = yes") == (("score.weight_norm", "true"),)   # YAML, one canonical line
    for bad, message, fix in (("score.statistic", "is not KEY=VALUE", "--vary score.statistic=l2"),
                              ("prune.sparsity=0.3", "changes a parameter the sweep sets itself", "--sparsities"),
                              ("merge.weights.boolq=0", "sets itself", "--methods"),
                              ("select.min_keep={mlp: 0.1", "the value is not YAML", "quote it")):
        with pytest.raises(FlowError, match=message) as e:
            parse_setting(bad)
        assert fix in e.value.fix
    with pytest.raises(FlowError, match="settings repeat"):
        make_points([0.2], ["vote"], None, ["score.statistic=l2", "score.statistic=l2"])
    with pytest.raises(FlowError, match="same experiment name"):
        make_points([0.2], ["vote"], None, ["calibration.seed=1", "calibration.seed='1'"])


def test_settings_are_read_back_from_the_params_the_experiments_differ_in():
    base = {"score": {"statistic": "mean_abs", "groups": ["mlp"]}, "evaluate": {"limit": 40}, "tasks": ["a"]}
    runs = [{"score": {"statistic": s, "groups": ["mlp"]}, "evaluate": {"limit": 300}, "prune": {"sparsity": x},
             "tasks": ["a"]} for s, x in (("mean_abs", 0.2), ("l2", 0.2), ("mean_abs", 0.3))]
    # evaluate.limit differs from the workspace but not among the runs (a --set); sparsity is swept
    assert inferred_settings(runs, base) == [(), (("score.statistic", "l2"),), ()]


def test_an_ablation_is_compared_with_its_default(synthetic):
    table, items, dense = synthetic
    vote = table[table["method"] == "vote"].iloc[0]
    ablated = vote.copy()
    ablated["setting"], ablated["experiment"] = "score.statistic=l2", "exp-l2"
    table = pd.concat([table, ablated.to_frame().T], ignore_index=True)
    items = {**items, "exp-l2": items["exp-task_agnostic"]}       # the ablation gives task_agnostic's answers
    out = add_paired_columns(table, items, dense).set_index("label")
    assert out.loc["vote score.statistic=l2", "acc_vs_default"] == pytest.approx(-0.1)
    assert out.loc["vote score.statistic=l2", "acc_vs_default_high"] < 0
    assert out["acc_vs_default"].drop("vote score.statistic=l2").isna().all()   # rows without a setting
    assert out.loc["vote", "best_baseline"] == "flap+bias"                      # an ablation is never a baseline
    assert "Δ acc vs default" in comparison_markdown(table.assign(**{c: out[c].to_numpy() for c in out.columns
                                                                     if c.startswith("acc_vs")}), None)


def test_a_row_pruning_other_groups_is_compared_with_the_default_groups(synthetic):
    table, items, dense = synthetic
    vote = table[table["method"] == "vote"].iloc[0]
    rows = [vote.copy() for _ in range(3)]
    for row, groups, exp in zip(rows, ("mlp", "mlp+hidden", "hidden"), ("exp-vote", "exp-mh", "exp-h")):
        row["groups"], row["experiment"] = groups, exp
    table = pd.DataFrame(rows)
    items = {"exp-vote": items["exp-vote"], "exp-mh": items["exp-task_agnostic"], "exp-h": items["exp-vote"]}
    out = add_paired_columns(table, items, dense, default_groups="mlp").set_index("groups")
    assert out.loc["mlp+hidden", "acc_vs_default"] == pytest.approx(-0.1)      # task_agnostic's answers vs vote's
    assert out.loc["hidden", "acc_vs_default"] == 0.0 and np.isnan(out.loc["mlp", "acc_vs_default"])
    assert add_paired_columns(table, items, dense)["acc_vs_default"].isna().all()   # no default groups known


def test_sweep_points_are_checked_like_the_stages_before_anything_runs(tmp_path):
    """A point the stages would refuse (an unscored group, a multiple as wide as the model's heads) fails in
    check_points, with the point and the fix named; the model's widths come from models/base's config."""
    import yaml

    from tests.repo_fixture import TINY_PARAMS, write_tiny_model

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tasks": ["t1", "t2"], **TINY_PARAMS}))
    hidden = make_points([0.2], ["vote"], ["mlp", "hidden"])
    with pytest.raises(FlowError, match=r"sweep point vote \[hidden\] @ 0.2: prune.groups prunes hidden, which "
                                        "score.groups does not score") as e:
        check_points(tmp_path, None, hidden)
    assert "add hidden to score.groups" in e.value.fix
    scored = {"score.groups": ["mlp", "attention", "hidden"]}
    check_points(tmp_path, scored, hidden)
    attention = make_points([0.2], ["vote"], ["mlp+attention"])
    assert check_points(tmp_path, scored, attention) is False  # no model in the workspace: config checks only
    write_tiny_model(tmp_path / "models" / "base")
    # another model.source: the workspace's model is not the sweep's, so only the config is checked now (the
    # sweep checks again once its model stage has run)
    assert check_points(tmp_path, {**scored, "model.source": "elsewhere"}, attention) is False
    with pytest.raises(FlowError, match=r"vote \[mlp\+attention\] @ 0.2: select.multiple = 8 is not smaller than "
                                        "the attention group's width") as e:
        check_points(tmp_path, scored, attention)
    assert "attention: 1}" in e.value.fix
    per_group = {**scored, "select.multiple": {"mlp": 8, "attention": 1, "hidden": 8}}
    check_points(tmp_path, per_group, attention)
    with pytest.raises(FlowError, match=r"vote \[attention\] @ 0.2: prune.sparsity 0.2 cannot be reached: .* at most "
                                        r"0.1655 of the decoder parameters") as e:    # one KV group of two per layer
        check_points(tmp_path, per_group, make_points([0.15, 0.2], ["vote"], ["attention"]))
    assert "prune.sparsity <= 0.1655" in e.value.fix
    with pytest.raises(FlowError, match="prune.recover: bias cannot hold the removed hidden"):
        check_points(tmp_path, scored, make_points([0.2], ["vote+bias"], ["mlp+hidden"]))


def test_tables_of_several_group_combinations_name_the_groups_and_the_total_size():
    rows = [{"method": "vote", "recover": "none", "groups": g, "sparsity": 0.2, "acc": a, "acc_norm": a,
             "acc_t1": a, "acc_norm_t1": a, "perplexity": 30.0, "params_total": n, "experiment": f"e-{g}"}
            for g, a, n in (("mlp", 0.41, 113_000_000), ("mlp+hidden", 0.39, 105_500_000))]
    table = pd.DataFrame(rows)
    assert list(with_labels(table)["label"]) == ["vote [mlp]", "vote [mlp+hidden]"]
    md = comparison_markdown(table, None)
    assert "total params (M)" in md and "| vote [mlp+hidden] | 0.39 / 0.39 |" in md and "| 105.5 |" in md
    one = table.iloc[:1]                                     # one combination: labels and columns as before
    assert list(with_labels(one)["label"]) == ["vote"] and "total params" not in comparison_markdown(one, None)
    old = table.drop(columns="groups").iloc[:1]              # a table written before groups were recorded
    assert list(with_labels(old)["label"]) == ["vote"]


def test_report_takes_the_latency_of_its_experiments(tmp_path):
    from flows.sweep_report import add_latency
    from flows.tables import LATENCY

    rows = [{"method": "vote", "recover": "none", "groups": g, "sparsity": 0.2, "acc": 0.4, "acc_norm": 0.4,
             "acc_t1": 0.4, "acc_norm_t1": 0.4, "perplexity": 30.0, "params_total": 1e8, "experiment": f"e-{g}"}
            for g in ("mlp", "hidden", "attention")]
    bench = tmp_path / "latency.json"
    bench.write_text(json.dumps({"variants": [
        {"name": "dense", "prefill_cpu_ratio": 1.0, "decode_cpu_ratio": 1.0},
        {"name": "vote [mlp]", "experiment": "e-mlp", "prefill_cpu_ratio": 0.81, "decode_cpu_ratio": 0.9},
        {"name": "vote [hidden]", "experiment": "e-hidden", "prefill_cpu_ratio": 0.75, "decode_cpu_ratio": 0.7}]}))
    table = add_latency(pd.DataFrame(rows), bench)
    assert table["prefill_cpu_ratio"].tolist()[:2] == [0.81, 0.75] and np.isnan(table["decode_cpu_ratio"][2])
    md = comparison_markdown(table, {"mean": {"acc": 0.5, "acc_norm": 0.5}, "tasks": {"t1": {"acc": 0.5}}})
    assert "prefill / decode CPU time (× dense)" in md and "| 1.00 / 1.00 |" in md and "| 0.75 / 0.70 |" in md
    assert "prefill" not in comparison_markdown(pd.DataFrame(rows), None) and set(LATENCY) <= set(table.columns)
    bench.write_text(json.dumps({"variants": [{"name": "uniform 0.2", "prefill_cpu_ratio": 0.8}]}))
    with pytest.raises(FlowError, match="times no experiment") as e:
        add_latency(pd.DataFrame(rows), bench)
    assert "--experiments PATTERN" in e.value.fix


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


def test_dense_results_of_two_machines_pair_and_another_models_do_not(tmp_path, synthetic):
    from flows.comparisons import SAME_LL_ATOL, same_items

    table, items, dense = synthetic
    with_lls = {t: {i: [*v, [-2.0, -3.5]] for i, v in by_id.items()} for t, by_id in dense.items()}
    # another CPU: every log-likelihood moved in its last bits, the same answers
    other_cpu = {t: {i: [*v[:2], [x + 0.5 * SAME_LL_ATOL for x in v[2]]] for i, v in by_id.items()}
                 for t, by_id in with_lls.items()}
    assert same_items(with_lls, other_cpu) and same_items(with_lls, with_lls)
    another_model = {t: {i: [*v[:2], [x + 0.05 for x in v[2]]] for i, v in by_id.items()} for t, by_id in with_lls.items()}
    flipped = json.loads(json.dumps(with_lls))
    flipped["t1"]["i0"][0] = 1.0 - flipped["t1"]["i0"][0]
    fewer = {t: dict(list(by_id.items())[:-1]) for t, by_id in with_lls.items()}
    for bad in (another_model, flipped, fewer, {"t1": with_lls["t1"]}):
        assert not same_items(with_lls, bad)
    plain = table[table["recover"] == "none"]
    plain.to_csv(tmp_path / "a.csv", index=False)
    table[table["recover"] == "bias"].to_csv(tmp_path / "b.csv", index=False)
    write_items(items_path(tmp_path / "a.csv"), {e: items[e] for e in plain["experiment"]}, with_lls)
    write_items(items_path(tmp_path / "b.csv"), {"exp-flap+bias": items["exp-flap+bias"]}, other_cpu)
    report(tmp_path, csvs=[tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "out")
    combined = pd.read_csv(tmp_path / "out" / "sweep.csv").set_index("experiment")
    assert combined.loc["exp-vote", "best_baseline"] == "flap+bias"          # the rows of both tables are paired
    write_items(items_path(tmp_path / "b.csv"), {"exp-flap+bias": items["exp-flap+bias"]}, another_model)
    with pytest.raises(FlowError, match="beside .*b.csv differ from another table's") as e:
        report(tmp_path, csvs=[tmp_path / "a.csv", tmp_path / "b.csv"], out=tmp_path / "out2")
    assert "same model" in e.value.fix and not (tmp_path / "out2").exists()


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
