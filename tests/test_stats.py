"""Paired bootstrap of accuracy differences (diet.evaluation.stats) on synthetic per-item results."""

import dataclasses

import numpy as np
import pytest

from diet.errors import DataError
from diet.evaluation.stats import MEAN, compare_metrics, format_difference, paired_bootstrap, PairedDifference


def planted(n: int, gain: int, seed: int = 0) -> tuple[dict, dict]:
    """Reference right on half of ``n`` items; the candidate also right on ``gain`` of the others."""
    rng = np.random.default_rng(seed)
    ref = rng.permutation(np.repeat([0, 1], n // 2))                    # (n,)
    cand = ref.copy()
    cand[np.flatnonzero(ref == 0)[:gain]] = 1
    return {f"q{i}": int(v) for i, v in enumerate(ref)}, {f"q{i}": int(v) for i, v in enumerate(cand)}


def test_planted_difference_inside_interval_and_significant():
    ref, cand = planted(2000, 200)                                      # +0.1 exactly
    out = paired_bootstrap({"boolq": ref}, {"boolq": cand}, n_resamples=2000, seed=3)
    d = out["boolq"]
    assert d.diff == pytest.approx(0.1) and d.n_items == 2000
    assert 0.0 < d.low < 0.1 < d.high and d.significant
    assert out[MEAN].diff == pytest.approx(0.1) and out[MEAN].low == d.low  # one task: the mean is the task
    assert format_difference(d).endswith("*")


def test_identical_models_interval_covers_zero():
    ref, _ = planted(500, 0)
    out = paired_bootstrap({"a": ref, "b": ref}, {"a": ref, "b": ref}, n_resamples=500)
    for d in out.values():
        assert d.diff == 0.0 and d.low <= 0.0 <= d.high and not d.significant


def test_unrelated_models_of_equal_accuracy_not_significant():
    ref, _ = planted(1000, 0, seed=1)
    other, _ = planted(1000, 0, seed=2)                                 # same accuracy, other items right
    d = paired_bootstrap({"t": ref}, {"t": other}, n_resamples=2000)["t"]
    assert d.diff == 0.0 and d.low < 0.0 < d.high and not d.significant


def test_seeded_and_mean_over_tasks():
    a_ref, a_cand = planted(400, 40, seed=1)                            # +0.1
    b_ref, b_cand = planted(200, 0, seed=2)                             # 0
    ref, cand = {"a": a_ref, "b": b_ref}, {"a": a_cand, "b": b_cand}
    one = paired_bootstrap(ref, cand, n_resamples=1500, seed=7)
    assert one == paired_bootstrap(ref, cand, n_resamples=1500, seed=7)
    assert one != paired_bootstrap(ref, cand, n_resamples=1500, seed=8)
    assert one[MEAN].diff == pytest.approx(0.05) and one[MEAN].n_items == 600
    assert one[MEAN].low < 0.05 < one[MEAN].high
    # a task's interval does not depend on the other tasks
    alone = paired_bootstrap({"a": a_ref}, {"a": a_cand}, n_resamples=1500, seed=7)
    assert alone["a"] == one["a"]


def test_mismatched_items_refused():
    ref, cand = planted(10, 2)
    with pytest.raises(DataError, match="item ids differ"):
        paired_bootstrap({"t": ref}, {"t": {**cand, "extra": 1}})
    with pytest.raises(DataError, match="different tasks"):
        paired_bootstrap({"t": ref}, {"u": cand})
    with pytest.raises(DataError, match="0 or 1"):
        paired_bootstrap({"t": ref}, {"t": {k: 0.5 for k in cand}})


def test_compare_metrics_and_format():
    ref, cand = planted(300, 30)
    as_metrics = lambda r: {"t": {i: {"acc": v, "acc_norm": 1 - v} for i, v in r.items()}}  # noqa: E731
    out = compare_metrics(as_metrics(ref), as_metrics(cand), n_resamples=300)
    assert out["acc"]["t"].diff == pytest.approx(0.1) and out["acc_norm"]["t"].diff == pytest.approx(-0.1)
    with pytest.raises(DataError, match="lack the metric"):
        compare_metrics(as_metrics(ref), {"t": {i: {"acc": v} for i, v in cand.items()}})
    d = PairedDifference(0.0314, 0.0041, 0.0579, 100, 0.95)
    assert format_difference(d) == "+0.031 [+0.004, +0.058]*"
    assert format_difference(dataclasses.replace(d, low=-0.01)) == "+0.031 [-0.010, +0.058]"


def test_perplexity_difference_is_paired_over_passages():
    from diet.evaluation.stats import perplexity_difference

    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, size=40)
    hard = rng.uniform(2.0, 5.0, size=40)                  # passages differ a lot in difficulty
    ref = {"nll": (hard * tokens).tolist(), "tokens": tokens.tolist()}
    worse = {"nll": ((hard + 0.1) * tokens).tolist(), "tokens": tokens.tolist()}   # every passage 0.1 nats worse
    d = perplexity_difference(ref, worse, n_resamples=2000)
    expected = np.exp((hard * tokens).sum() / tokens.sum() + 0.1) - np.exp((hard * tokens).sum() / tokens.sum())
    assert d.diff == pytest.approx(expected) and d.significant and d.low > 0 and d.n_items == 40
    same = perplexity_difference(ref, ref, n_resamples=500)
    assert same.diff == 0 and same.low == 0 and same.high == 0 and not same.significant
    noisy = {"nll": ((hard + rng.normal(0, 0.3, 40)) * tokens).tolist(), "tokens": tokens.tolist()}
    n = perplexity_difference(ref, noisy, n_resamples=2000)
    assert n.low < n.diff < n.high


@pytest.mark.parametrize("candidate, needle", [({"nll": [1.0, 2.0], "tokens": [3, 5]}, "different passages"),
                                               ({"ppl": 3.0}, "no per-passage values")])
def test_perplexity_difference_refuses_unpaired_or_old_results(candidate, needle):
    from diet.evaluation.stats import perplexity_difference

    with pytest.raises(DataError, match=needle):
        perplexity_difference({"nll": [1.0, 2.0], "tokens": [3, 4]}, candidate)
