"""Normalisation, vote merge and budgeted selection: exact examples and properties."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diet.config import Params, check_weights
from diet.errors import ConfigError, DataError
from diet.budget import keep_count, removal_fraction, removal_targets, removed_params, shared_params
from diet.merge import (_descending_order, layer_agreement, magnitude_scores, means_source, merge,
                        moment_baseline_scores, normalize, recovery_means, task_keep_mask)
from diet.geometry import Geometry
from diet.mask import Mask
from diet.select import check_budget, floor_width, select
from diet.groups import GROUPS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _order(priority):
    """Flat indices, keep-first, from a priority tensor."""
    return torch.argsort(priority.reshape(-1), descending=True, stable=True).tolist()


def _is_permutation_priority(priority):
    return sorted(priority.reshape(-1).tolist()) == list(range(1, priority.numel() + 1))


# -- normalize -----------------------------------------------------------------------------------------------------
def test_normalize_per_layer():
    x = torch.rand(3, 10) * torch.tensor([[1.0], [100.0], [0.01]])
    z = normalize(x, "zscore")
    torch.testing.assert_close(z.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z.std(1, correction=0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(normalize(x, "mean").mean(1), torch.ones(3, dtype=torch.float64))
    r = normalize(x, "rank")
    assert r.min() == 0 and r.max() == 1 and torch.equal(r.argsort(1), x.argsort(1))
    assert torch.equal(normalize(x, "none"), x.double())
    const = torch.ones(2, 5)
    assert torch.equal(normalize(const, "zscore"), torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ConfigError):
        normalize(x, "minmax")
    with pytest.raises(Exception, match="NaN"):
        normalize(torch.tensor([[1.0, float("nan")]]), "none")


def test_task_keep_mask_global_topk_with_ties_to_lowest_position():
    s = torch.tensor([[1.0, 5.0, 3.0], [5.0, 2.0, 3.0]])
    keep = task_keep_mask(s, 3)
    assert keep.tolist() == [[False, True, True], [True, False, False]]  # 3.0 tie: layer 0 wins
    assert task_keep_mask(s, 0).sum() == 0 and task_keep_mask(s, 6).all()


# -- merge ---------------------------------------------------------------------------------------------------------
def test_vote_order_documented_example():
    # one layer, budget 2: a keeps {0, 1}, b keeps {1, 2}; votes [1, 2, 1, 0]
    # mean score [2.5, 3.5, 2.5, 1.5]: dims 0 and 2 tie on votes and score -> lower index first
    a = {"mlp": torch.tensor([[4.0, 3.0, 2.0, 1.0]])}
    b = {"mlp": torch.tensor([[1.0, 4.0, 3.0, 2.0]])}
    out = merge({"a": a, "b": b}, method="vote", normalize="none", weights={}, budget={"mlp": 2})["mlp"]
    assert out["votes"].tolist() == [[1.0, 2.0, 1.0, 0.0]]
    assert _order(out["priority"]) == [1, 0, 2, 3]
    assert out["priority"].tolist() == [[3.0, 4.0, 2.0, 1.0]]
    assert out["agreement"].tolist() == pytest.approx([1 / 3])


def test_votes_beat_scores():
    # dim 2 has by far the highest mean score but one vote; dim 0 (two votes) outranks it
    a = {"mlp": torch.tensor([[2.0, 1.0, 0.0, 0.5]])}
    b = {"mlp": torch.tensor([[1.0, 2.0, 100.0, 0.0]])}
    c = {"mlp": torch.tensor([[2.0, 1.5, 0.0, 0.1]])}
    out = merge({"a": a, "b": b, "c": c}, method="vote", normalize="none", weights={}, budget={"mlp": 2})["mlp"]
    assert out["votes"].tolist() == [[2.0, 3.0, 1.0, 0.0]]
    assert _order(out["priority"]) == [1, 0, 2, 3]


@SETTINGS
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 4), width=st.integers(1, 12),
       method=st.sampled_from(["vote", "mean", "rank"]), how=st.sampled_from(["none", "mean", "zscore", "rank"]),
       share=st.floats(0.0, 1.0))
def test_one_task_reduces_to_its_own_ranking(seed, layers, width, method, how, share):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(layers, width, generator=g)
    k = round(share * layers * width)
    out = merge({"t": {"mlp": s}}, method=method, normalize=how, weights={}, budget={"mlp": k})["mlp"]
    assert _order(out["priority"]) == _descending_order(normalize(s, how)).tolist()
    assert torch.equal(out["votes"], task_keep_mask(normalize(s, how), k).float())
    assert torch.equal(out["agreement"], torch.ones(layers))


@SETTINGS
@given(seed=st.integers(0, 10_000), n_tasks=st.integers(1, 4), method=st.sampled_from(["vote", "mean", "rank"]),
       how=st.sampled_from(["none", "mean", "zscore", "rank"]), k=st.integers(0, 24))
def test_ties_deterministic_and_zero_weight_changes_nothing(seed, n_tasks, method, how, k):
    g = torch.Generator().manual_seed(seed)
    # small integer scores: many ties in votes and scores
    tasks = {f"t{i}": {"mlp": torch.randint(0, 3, (3, 8), generator=g).float()} for i in range(n_tasks)}
    weights = {t: float(i % 3 + 1) for i, t in enumerate(tasks)}
    kw = dict(method=method, normalize=how, budget={"mlp": k})
    first = merge(tasks, weights=weights, **kw)["mlp"]
    again = merge(dict(reversed(list(tasks.items()))), weights=weights, **kw)["mlp"]
    assert _is_permutation_priority(first["priority"])
    for key in first:
        assert torch.equal(first[key], again[key])
    extra = {**tasks, "zero": {"mlp": torch.rand(3, 8, generator=g) * 10}}
    with_zero = merge(extra, weights={**weights, "zero": 0.0}, **kw)["mlp"]
    for key in first:
        assert torch.equal(first[key], with_zero[key])


def test_weights_count_in_votes():
    s_a = {"mlp": torch.tensor([[3.0, 2.0, 1.0]])}  # keeps dim 0
    s_b = {"mlp": torch.tensor([[1.0, 2.0, 3.0]])}  # keeps dim 2
    out = merge({"a": s_a, "b": s_b}, method="vote", normalize="none", weights={"a": 0.5, "b": 2.0},
                budget={"mlp": 1})["mlp"]
    assert out["votes"].tolist() == [[0.5, 0.0, 2.0]]
    assert _order(out["priority"])[0] == 2
    with pytest.raises(ConfigError):  # a task-aware method with no task of positive weight
        merge({"a": s_a}, method="vote", normalize="none", weights={"a": 0.0}, budget={"mlp": 1})


def test_merge_weights_are_checked_once_against_the_tasks_where_they_are_read():
    with pytest.raises(ConfigError, match="'nope', not in 'tasks'"):
        check_weights({"nope": 1.0}, ["a"])
    with pytest.raises(ConfigError, match="every task weight 0"):
        check_weights({"a": 0.0}, ["a"])
    check_weights({"a": 0.0}, ["a", "b"])  # b weighs 1.0
    with pytest.raises(ConfigError, match="'nope', not in 'tasks'"):
        Params.from_dict({"tasks": ["a"], "merge": {"weights": {"nope": 1.0}}})


def test_mean_rank_and_baselines_run():
    g = torch.Generator().manual_seed(3)
    tasks = {t: {"mlp": torch.rand(2, 6, generator=g), "attention": torch.rand(2, 3, generator=g)} for t in "abc"}
    budget = {"mlp": 7, "attention": 3}
    generic = {"mlp": torch.rand(2, 6, generator=g), "attention": torch.rand(2, 3, generator=g)}
    mag = {"mlp": torch.rand(2, 6, generator=g), "attention": torch.rand(2, 3, generator=g)}
    for method in ["vote", "mean", "rank", "task_agnostic", "magnitude", "random", "wanda_sp", "flap"]:
        out = merge(tasks, method=method, normalize="zscore", weights={}, budget=budget, seed=5,
                    generic=generic, magnitude=mag, baseline=mag)
        for group, shape in [("mlp", (2, 6)), ("attention", (2, 3))]:
            assert out[group]["priority"].shape == shape and _is_permutation_priority(out[group]["priority"])
            assert out[group]["votes"].sum() == 3 * budget[group]
            assert out[group]["agreement"].shape == (2,)
    agn = merge(tasks, method="task_agnostic", normalize="zscore", weights={}, budget=budget, generic=generic)
    assert _order(agn["mlp"]["priority"]) == _descending_order(normalize(generic["mlp"], "zscore")).tolist()
    r1 = merge({}, method="random", normalize="none", weights={}, budget={"mlp": 3}, seed=1, magnitude=mag)
    r2 = merge({}, method="random", normalize="none", weights={}, budget={"mlp": 3}, seed=1, magnitude=mag)
    r3 = merge({}, method="random", normalize="none", weights={}, budget={"mlp": 3}, seed=2, magnitude=mag)
    assert torch.equal(r1["mlp"]["priority"], r2["mlp"]["priority"])
    assert not torch.equal(r1["mlp"]["priority"], r3["mlp"]["priority"])
    with pytest.raises(ConfigError):
        merge(tasks, method="task_agnostic", normalize="zscore", weights={}, budget=budget)
    # rank: a ranks dims [0, 1, 2], b ranks them [2, 1, 0]: all mean ranks are 1; the mean score
    # [2, 2.25, 2] puts dim 1 first, then dims 0 and 2 tie and go by index
    ranked = merge({"a": {"mlp": torch.tensor([[3.0, 2.0, 1.0]])}, "b": {"mlp": torch.tensor([[1.0, 2.5, 3.0]])}},
                   method="rank", normalize="none", weights={}, budget={"mlp": 1})
    assert _order(ranked["mlp"]["priority"]) == [1, 0, 2]


def test_layer_agreement():
    a = torch.tensor([[True, True, False, False], [True, False, False, False]])
    b = torch.tensor([[True, True, False, False], [False, True, False, False]])
    assert layer_agreement([a, b]).tolist() == [1.0, 0.0]
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert layer_agreement([none, none]).tolist() == [1.0, 1.0]


def test_magnitude_scores_brute_force():
    from diet.adapters import get_adapter
    from tests.tiny import tiny_model

    model = tiny_model("qwen2")  # q/k/v carry biases
    adapter = get_adapter(model)
    mag = magnitude_scores(model, groups=["mlp", "attention"])
    (gate, up), down = adapter.mlp_projections(1)
    j = 5
    want = torch.cat([gate.weight[j], up.weight[j], down.weight[:, j]]).norm()
    torch.testing.assert_close(mag["mlp"][1, j], want.detach())
    q, k, v, o = adapter.attention_projections(0)
    assert q.bias is not None
    g = 1  # head_dim 8, 2 query heads per group: KV group 1 = q rows 16:32, k/v rows 8:16, o columns 16:32
    parts = [q.weight[16:32], q.bias[16:32], k.weight[8:16], k.bias[8:16], v.weight[8:16], v.bias[8:16],
             o.weight[:, 16:32]]
    want = torch.cat([p.reshape(-1) for p in parts]).norm()
    torch.testing.assert_close(mag["attention"][0, g], want.detach())


def _moments(model, seed=0):
    """Random per-channel moments of each output projection's input: {group: {"mean", "var"}} of (L, D)."""
    from diet.adapters import get_adapter

    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    out = {}
    for group in ("mlp", "attention"):
        shape = (adapter.num_layers, GROUPS[group].output_projection(adapter, 0).in_features)
        out[group] = {"mean": torch.randn(shape, generator=g), "var": torch.rand(shape, generator=g)}
    return out


def test_wanda_sp_and_flap_scores_brute_force():
    from diet.adapters import get_adapter
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    adapter = get_adapter(model)
    moments = _moments(model)
    wanda = moment_baseline_scores("wanda_sp", model, moments, groups=["mlp", "attention"])
    flap = moment_baseline_scores("flap", model, moments, groups=["mlp", "attention"])
    assert wanda["mlp"].shape == flap["mlp"].shape == (3, 64)
    assert wanda["attention"].shape == flap["attention"].shape == (3, 2)
    down = adapter.mlp_projections(2)[1].weight.detach()                     # (H, I)
    j = 7
    mean, var = moments["mlp"]["mean"][2, j], moments["mlp"]["var"][2, j]
    rms = (var + mean ** 2).sqrt()                                           # norm over tokens / sqrt(tokens)
    torch.testing.assert_close(wanda["mlp"][2, j], sum(down[i, j].abs() * rms for i in range(down.shape[0])))
    torch.testing.assert_close(flap["mlp"][2, j], var * sum(down[i, j] ** 2 for i in range(down.shape[0])))
    o = adapter.attention_projections(1)[3].weight.detach()                  # (H, 4 heads * 8)
    cols = range(16, 32)                                                     # KV group 1: query heads 2 and 3
    m = moments["attention"]
    want_w = sum(o[:, c].abs().sum() * (m["var"][1, c] + m["mean"][1, c] ** 2).sqrt() for c in cols)
    want_f = sum(m["var"][1, c] * o[:, c].square().sum() for c in cols)
    torch.testing.assert_close(wanda["attention"][1, 1], want_w)
    torch.testing.assert_close(flap["attention"][1, 1], want_f)
    with pytest.raises(DataError, match="moments"):
        moment_baseline_scores("flap", model, {"attention": m}, groups=["mlp"])
    with pytest.raises(DataError, match="channels"):
        moment_baseline_scores("flap", model, {"mlp": {"mean": torch.zeros(3, 5), "var": torch.zeros(3, 5)}})


def test_hidden_magnitude_and_baselines_brute_force():
    """hidden: one row; magnitude takes every weight of a residual channel (embedding and untied head columns,
    reader columns, writer rows and biases, norm entries); wanda_sp / flap read the channel's columns in every
    q/k/v/gate/up projection."""
    from diet.adapters import get_adapter
    from tests.tiny import tiny_model

    model = tiny_model("gemma2", tie_word_embeddings=False)
    adapter = get_adapter(model)
    c = 9
    mag = magnitude_scores(model, groups=["hidden"])["hidden"]
    assert mag.shape == (1, 32)
    parts = [model.get_input_embeddings().weight[:, c], model.lm_head.weight[:, c], adapter.final_norm().weight[c:c + 1]]
    readers = []
    for i in range(adapter.num_layers):
        q, k, v, o = adapter.attention_projections(i)
        (gate, up), down = adapter.mlp_projections(i)
        readers += [q, k, v, gate, up]
        parts += [p.weight[:, c] for p in (q, k, v, gate, up)] + [o.weight[c], down.weight[c]]
        parts += [n.weight[c:c + 1] for n in (*adapter.residual_norms(i), *adapter.branch_norms(i))]
    torch.testing.assert_close(mag[0, c], torch.cat([p.reshape(-1) for p in parts]).norm().detach())
    g = torch.Generator().manual_seed(2)
    moments = {"hidden": {"mean": torch.randn(1, 32, generator=g), "var": torch.rand(1, 32, generator=g)}}
    wanda = moment_baseline_scores("wanda_sp", model, moments, groups=["hidden"])["hidden"]
    flap = moment_baseline_scores("flap", model, moments, groups=["hidden"])["hidden"]
    assert wanda.shape == flap.shape == (1, 32)
    mean, var = moments["hidden"]["mean"][0, c], moments["hidden"]["var"][0, c]
    abs_sum = sum(p.weight[:, c].abs().sum() for p in readers).detach()
    sq_sum = sum(p.weight[:, c].square().sum() for p in readers).detach()
    torch.testing.assert_close(wanda[0, c], abs_sum * (var + mean ** 2).sqrt())
    torch.testing.assert_close(flap[0, c], var * sq_sum)
    with pytest.raises(DataError, match="rows"):
        moment_baseline_scores("flap", model, {"hidden": {"mean": torch.zeros(3, 32), "var": torch.zeros(3, 32)}},
                               groups=["hidden"])


def test_flap_always_standardises_wanda_sp_follows_normalize():
    g = torch.Generator().manual_seed(4)
    base = {"mlp": torch.rand(3, 6, generator=g) * torch.tensor([[1.0], [10.0], [100.0]])}  # layers of other scales
    budget = {"mlp": 9}
    flap = merge({}, method="flap", normalize="none", weights={}, budget=budget, baseline=base)
    wanda = merge({}, method="wanda_sp", normalize="none", weights={}, budget=budget, baseline=base)
    assert _order(flap["mlp"]["priority"]) == _descending_order(normalize(base["mlp"], "zscore")).tolist()
    assert _order(wanda["mlp"]["priority"]) == _descending_order(base["mlp"]).tolist()
    assert _order(flap["mlp"]["priority"]) != _order(wanda["mlp"]["priority"])
    with pytest.raises(ConfigError, match="flap"):
        merge({}, method="flap", normalize="zscore", weights={}, budget=budget)


def test_recovery_means_follow_the_methods_data():
    g = torch.Generator().manual_seed(5)
    task = {t: {"mlp": {"mean": torch.randn(2, 4, generator=g)}} for t in "abc"}
    generic = {"mlp": {"mean": torch.randn(2, 4, generator=g)}}
    assert [means_source(m) for m in ("vote", "mean", "rank")] == ["tasks"] * 3
    assert [means_source(m) for m in ("task_agnostic", "wanda_sp", "flap", "magnitude", "random")] == ["generic"] * 5
    plain = recovery_means("vote", ["mlp"], task_moments=task, generic_moments=generic)
    torch.testing.assert_close(plain["mlp"], (task["a"]["mlp"]["mean"] + task["b"]["mlp"]["mean"]
                                              + task["c"]["mlp"]["mean"]) / 3)
    weighted = recovery_means("rank", ["mlp"], task_moments=task, weights={"a": 3.0, "c": 0})
    torch.testing.assert_close(weighted["mlp"], (3 * task["a"]["mlp"]["mean"] + task["b"]["mlp"]["mean"]) / 4)
    for method in ("flap", "random"):
        assert torch.equal(recovery_means(method, ["mlp"], task_moments=task, generic_moments=generic)["mlp"],
                           generic["mlp"]["mean"])
    with pytest.raises(DataError, match="generic"):
        recovery_means("magnitude", ["mlp"], task_moments=task)
    with pytest.raises(DataError, match="positive weight"):
        recovery_means("vote", ["mlp"], task_moments=task, weights={t: 0 for t in "abc"})
    with pytest.raises(DataError, match="attention"):
        recovery_means("vote", ["attention"], task_moments=task)
    with pytest.raises(ConfigError):
        means_source("best")


# -- budget --------------------------------------------------------------------------------------------------------
def test_removal_targets_same_fraction_per_group():
    widths = {"mlp": [10, 10], "attention": [2, 2]}
    costs = {"mlp": [30, 30], "attention": [100, 100]}
    t = removal_targets(widths, costs, 0.25, 2000, ["mlp", "attention"])
    assert t["mlp"] / 600 == pytest.approx(t["attention"] / 400)
    assert sum(t.values()) == pytest.approx(500)
    # f = 500 / 1000: mlp removes 300 params = 10 dims of 20, attention 200 = 2 of 4
    assert keep_count(widths, costs, 0.25, 2000, ["mlp", "attention"]) == {"mlp": 10, "attention": 2}
    with pytest.raises(ConfigError, match="0.500"):
        removal_targets(widths, costs, 0.6, 2000, ["mlp", "attention"])


def test_budget_counts_parameters_two_groups_share_once():
    """hidden (one row of 4 channels) crosses mlp (2 layers of 10): each pair of a residual and an MLP channel
    shares 3 weights. Removing the fraction f of each group removes f * P - f^2 * C parameters, and the targets
    are f times each group's own parameters."""
    widths = {"mlp": [10, 10], "hidden": [4]}
    costs = {"mlp": [15, 15], "hidden": [70]}      # mlp: 3 x 4 shared + 3 own; hidden: 3 x 20 shared + 10 own
    crossings = {"hidden": {"mlp": [3, 3]}}
    assert shared_params(widths, crossings, ["mlp", "hidden"]) == 4 * 20 * 3
    assert shared_params(widths, crossings, ["mlp"]) == 0
    decoder = 300 + 280 - 240 + 60                  # the groups' parameters once each, plus 60 others
    t = removal_targets(widths, costs, 0.3, decoder, ["mlp", "hidden"], crossings)
    f = t["mlp"] / 300
    assert t["hidden"] / 280 == pytest.approx(f)
    assert f * 580 - f * f * 240 == pytest.approx(0.3 * decoder)
    assert removal_fraction(580, 240, 0.3 * decoder) == pytest.approx(f)
    # inclusion-exclusion: 5 MLP channels and 2 residual channels removed share 5 x 2 x 3 weights
    assert removed_params({"mlp": [2, 3], "hidden": [2]}, costs, crossings) == 5 * 15 + 2 * 70 - 5 * 2 * 3
    with pytest.raises(ConfigError, match="hold only 340"):
        removal_targets(widths, costs, 0.9, decoder, ["mlp", "hidden"], crossings)


@pytest.mark.parametrize("layout", ["global", "uniform"])
def test_select_with_the_hidden_group_counts_shared_parameters_once(layout):
    widths = {"mlp": [10, 10], "hidden": [8]}
    costs = {"mlp": [27, 27], "hidden": [70]}
    crossings = {"hidden": {"mlp": [3, 3]}}
    decoder = 540 + 560 - 8 * 20 * 3 + 100
    g = torch.Generator().manual_seed(0)
    prio = {"mlp": torch.rand(2, 10, generator=g), "hidden": torch.rand(1, 8, generator=g)}
    mask = select(prio, widths, costs, sparsity=0.3, decoder_params=decoder, min_keep=0.05, multiple=1,
                  layout=layout, crossings=crossings)
    dropped = {grp: [w - k for w, k in zip(widths[grp], mask.widths[grp])] for grp in widths}
    assert mask.removed == removed_params(dropped, costs, crossings)
    assert len(mask.keep["hidden"]) == 1 and 0 < mask.widths["hidden"][0] < 8
    assert mask.sparsity == pytest.approx(0.3, abs=0.06)
    with pytest.raises(ConfigError, match="cannot be reached") as refused:
        select(prio, widths, costs, sparsity=0.6, decoder_params=decoder, min_keep=0.5, multiple=1,
               layout=layout, crossings=crossings)
    # the same refusal from the geometry alone, before any priority exists; a reachable budget passes
    geo = Geometry(widths=widths, costs=costs, decoder_params=decoder, crossings=crossings)
    with pytest.raises(ConfigError, match="cannot be reached") as early:
        check_budget(geo, ["mlp", "hidden"], 0.6, 0.5, 1, layout)
    assert str(early.value) == str(refused.value)
    check_budget(geo, ["mlp", "hidden"], 0.3, 0.05, 1, layout)


def test_floor_width():
    assert floor_width(20, 0.05, 1) == 1 and floor_width(20, 0.0, 1) == 1
    assert floor_width(20, 0.05, 8) == 8 and floor_width(20, 0.5, 8) == 16
    assert floor_width(6, 0.5, 8) == 6  # capped at the width


@st.composite
def budgets(draw):
    layers = draw(st.integers(1, 6))
    width = draw(st.integers(2, 40))
    same_cost = draw(st.booleans())
    costs = [draw(st.integers(1, 50)) for _ in range(1 if same_cost else layers)] * (layers if same_cost else 1)
    other = draw(st.integers(0, 5000))
    return dict(layers=layers, width=width, costs=costs, other=other,
                sparsity=draw(st.floats(0.01, 0.99)), min_keep=draw(st.sampled_from([0.0, 0.05, 0.2, 0.5])),
                multiple=draw(st.sampled_from([1, 1, 2, 4, 8])), layout=draw(st.sampled_from(["global", "uniform"])),
                seed=draw(st.integers(0, 1000)))


@SETTINGS
@given(case=budgets())
def test_select_properties(case):
    L, W, costs, mult, layout = case["layers"], case["width"], case["costs"], case["multiple"], case["layout"]
    widths = {"mlp": [W] * L}
    decoder = W * sum(costs) + case["other"]
    g = torch.Generator().manual_seed(case["seed"])
    prio = (torch.randperm(L * W, generator=g).float() + 1).view(L, W)
    floor = floor_width(W, case["min_keep"], mult)
    target = case["sparsity"] * decoder
    if layout == "uniform":
        least = -(-floor // mult) * mult
        most = (W - (least if least <= W else W)) * sum(costs)
    else:
        most = (W - floor) * sum(costs)
    kw = dict(sparsity=case["sparsity"], decoder_params=decoder, min_keep=case["min_keep"], multiple=mult,
              layout=layout)
    if target > most + 1e-6:
        with pytest.raises(ConfigError, match="at most"):
            select({"mlp": prio}, widths, {"mlp": costs}, **kw)
        return
    mask = select({"mlp": prio}, widths, {"mlp": costs}, **kw)
    kept = mask.widths["mlp"]
    removed = sum((W - k) * c for k, c in zip(kept, costs))
    assert mask.removed == removed and mask.params_after == decoder - removed
    assert mask.sparsity == pytest.approx(removed / decoder)
    for k, idx in zip(kept, mask.keep["mlp"]):
        assert k >= 1 and k >= floor                             # never empty, min_keep honoured
        assert k == W or k % mult == 0                           # multiple honoured
        assert idx == sorted(idx) and len(set(idx)) == k
    for layer, idx in enumerate(mask.keep["mlp"]):                # each layer keeps its top-priority dims
        assert set(idx) == set(torch.argsort(prio[layer], descending=True)[: len(idx)].tolist())
    if layout == "uniform":
        assert len(set(kept)) == 1
        assert abs(removed - target) <= mult * sum(costs) / 2 + 1e-6   # one rounding multiple per layer
    elif mult == 1:
        assert abs(removed - target) <= max(costs) / 2 + 1e-6          # exact: within one dimension's cost
    else:
        assert abs(removed - target) <= mult * max(costs) / 2 + 1e-6   # within one block


@SETTINGS
@given(case=budgets())
def test_global_multiple_one_follows_priority(case):
    """With multiple 1 and equal costs, the kept set is the global top of the priority, above the floors."""
    L, W = case["layers"], case["width"]
    g = torch.Generator().manual_seed(case["seed"])
    prio = (torch.randperm(L * W, generator=g).float() + 1).view(L, W)
    cost = case["costs"][0]
    try:
        mask = select({"mlp": prio}, {"mlp": [W] * L}, {"mlp": [cost] * L}, sparsity=case["sparsity"],
                      decoder_params=W * L * cost + case["other"], min_keep=case["min_keep"], multiple=1,
                      layout="global")
    except ConfigError:
        return
    kept = torch.zeros(L, W, dtype=torch.bool)
    for layer, idx in enumerate(mask.keep["mlp"]):
        kept[layer, idx] = True
    floor = floor_width(W, case["min_keep"], 1)
    # every removed dim has lower priority than every kept dim of a layer above its floor
    removable_kept = [prio[layer, kept[layer]].min() for layer in range(L) if kept[layer].sum() > floor]
    if removable_kept and (~kept).any():
        assert prio[~kept].max() < min(removable_kept)


def test_select_two_groups_and_mask_json(tmp_path):
    g = torch.Generator().manual_seed(0)
    widths = {"mlp": [32, 32, 32], "attention": [4, 4, 4]}
    costs = {"mlp": [48, 48, 48], "attention": [512, 512, 512]}
    prio = {"mlp": torch.rand(3, 32, generator=g), "attention": torch.rand(3, 4, generator=g)}
    decoder = 3 * (32 * 48 + 4 * 512) + 300
    mask = select(prio, widths, costs, sparsity=0.3, decoder_params=decoder, min_keep=0.25, multiple=1,
                  layout="global")
    assert abs(mask.removed - 0.3 * decoder) <= (48 + 512) / 2
    assert min(mask.widths["attention"]) >= 1 and min(mask.widths["mlp"]) >= 8
    mask.save(tmp_path / "mask.json")
    back = Mask.load(tmp_path / "mask.json")
    assert back.keep == mask.keep and back.widths == mask.widths and back.removed == mask.removed
    summary = mask.to_json()["summary"]
    assert summary["groups"]["mlp"]["kept_dims"] == sum(mask.widths["mlp"])
    assert math.isclose(summary["achieved_sparsity"], mask.sparsity, abs_tol=1e-6)
    assert [t.dtype for t in mask.keep_tensors()["mlp"]] == [torch.long] * 3


def test_impossible_budget_names_the_reachable_sparsity():
    prio = {"mlp": torch.rand(2, 16)}
    with pytest.raises(ConfigError) as err:
        select(prio, {"mlp": [16, 16]}, {"mlp": [10, 10]}, sparsity=0.9, decoder_params=320, min_keep=0.5,
               multiple=1, layout="global")
    assert "at most 0.5000" in str(err.value) and "prune.sparsity <= 0.5" in str(err.value)
    with pytest.raises(ConfigError):
        select(prio, {"mlp": [16, 16]}, {"mlp": [10, 10]}, sparsity=0.2, decoder_params=320, min_keep=0.0,
               multiple=1, layout="diagonal")


@pytest.mark.parametrize("layout", ["global", "uniform"])
def test_per_group_constraints_apply_to_their_own_group(layout, tmp_path):
    """multiple / min_keep given per group: each group's widths follow its own values, and the mask file
    records the mapping and reads it back; a scalar stays a scalar in the file."""
    g = torch.Generator().manual_seed(1)
    widths = {"mlp": [64, 64, 64], "attention": [4, 4, 4]}
    costs = {"mlp": [96, 96, 96], "attention": [1536, 1536, 1536]}
    prio = {"mlp": torch.rand(3, 64, generator=g), "attention": torch.rand(3, 4, generator=g)}
    decoder = 3 * (64 * 96 + 4 * 1536) + 300
    kw = dict(sparsity=0.3, decoder_params=decoder, layout=layout)
    multiple, min_keep = {"mlp": 8, "attention": 1}, {"mlp": 0.05, "attention": 0.5}
    mask = select(prio, widths, costs, min_keep=min_keep, multiple=multiple, **kw)
    assert all(w % 8 == 0 for w in mask.widths["mlp"]) and sum(mask.widths["mlp"]) < 192
    assert all(2 <= w < 4 for w in mask.widths["attention"])    # whole KV groups removed, min_keep 0.5 of 4 kept
    assert mask.multiple == multiple and mask.min_keep == min_keep
    mask.save(tmp_path / "mask.json")
    back = Mask.load(tmp_path / "mask.json")
    assert back.multiple == multiple and back.min_keep == min_keep and back.keep == mask.keep
    # one value for every group, as before: a scalar in the file
    scalar = select({"mlp": prio["mlp"]}, widths, costs, min_keep=0.05, multiple=8, **kw)
    assert scalar.multiple == 8 and scalar.min_keep == 0.05 and scalar.to_json()["multiple"] == 8
    # multiple 8 leaves 4 KV groups no smaller width: the group is stuck, and the fix says how to free it
    with pytest.raises(ConfigError) as err:
        select(prio, widths, costs, min_keep=0.05, multiple=8, **kw)
    assert "'attention' has nothing to remove" in err.value.problem
    assert "give attention its own select.multiple" in err.value.fix


def test_per_group_constraints_must_name_every_selected_group():
    prio = {"mlp": torch.rand(2, 16), "attention": torch.rand(2, 4)}
    widths, costs = {"mlp": [16, 16], "attention": [4, 4]}, {"mlp": [10, 10], "attention": [40, 40]}
    with pytest.raises(ConfigError) as err:
        select(prio, widths, costs, sparsity=0.2, decoder_params=800, min_keep=0.0, multiple={"mlp": 8},
               layout="global")
    assert "none for attention" in err.value.problem and "attention: <value>" in err.value.fix
    with pytest.raises(ConfigError, match="unknown group 'heads'"):
        select(prio, widths, costs, sparsity=0.2, decoder_params=800, min_keep={"heads": 0.1}, multiple=1,
               layout="global")


@pytest.mark.parametrize("widths, groups, min_keep, multiple, needles", [
    ({"mlp": [64] * 2, "attention": [3] * 2}, ["mlp", "attention"], 0.05, 8,
     ("select.multiple = 8 is not smaller than the attention group's width", "{mlp: 8, attention: 1}")),
    ({"mlp": [64] * 2, "attention": [3] * 2}, ["mlp", "attention"], {"mlp": 0.05, "attention": 0.7},
     {"mlp": 8, "attention": 1}, ("select.min_keep.attention = 0.7 keeps every attention dimension",
                                  "at most 0.6666 (keeping 2 of 3)")),
    ({"mlp": [64] * 2}, ["mlp"], 0.9, 8, ("select.min_keep = 0.9 keeps every mlp dimension",
                                          "at most 0.875 (keeping 56 of 64)")),
    ({"mlp": [64] * 2, "attention": [1] * 2}, ["mlp", "attention"], 0.05, {"mlp": 8, "attention": 1},
     ("attention group cannot be pruned", "single KV head", "set prune.groups to ['mlp']")),
], ids=["multiple-wider-than-group", "min-keep-keeps-all", "multiple-rounds-min-keep-up", "one-kv-head"])
def test_check_constraints_names_the_key_and_the_fix(widths, groups, min_keep, multiple, needles):
    from diet.select import check_constraints

    with pytest.raises(ConfigError) as err:
        check_constraints(widths, groups, min_keep, multiple)
    for needle in needles:
        assert needle in str(err.value)


def test_check_constraints_accepts_what_leaves_something_to_prune():
    from diet.select import check_constraints

    check_constraints({"mlp": [64] * 2, "attention": [3] * 2}, ["mlp", "attention"],
                      {"mlp": 0.05, "attention": 0.34}, {"mlp": 8, "attention": 1})
    check_constraints({"mlp": [64] * 2, "attention": [1] * 2}, ["mlp"], 0.05, 8)  # attention not pruned
