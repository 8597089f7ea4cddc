"""prune.recover: refit / refit_bias (diet.refit): exact where the removed channels are linear combinations of kept
ones, never worse than keeping the dense columns, sequential, and refused where it cannot serve."""

from __future__ import annotations

import copy

import pytest
import torch

from diet.adapters import get_adapter
from diet.config import Params
from diet.errors import ConfigError
from diet.groups import GROUPS
from diet.checkpoint import load_model, save_pruned
from diet.pruning import apply_mask
from diet.refit import Batch, calibration_batches, refit
from tests.tiny import FAMILIES, VOCAB, tiny_model, tiny_tokenizer


def sequences(n: int = 24, length: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    return [torch.randint(4, VOCAB, (int(t),), generator=g).tolist() for t in lengths]


def batches(n: int = 24, seed: int = 0) -> list[Batch]:
    return calibration_batches({"t": sequences(n, seed=seed)}, weights=None, batch_size=8, pad_id=0)


def logits(model, seqs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])


def duplicate_mlp_channels(model) -> dict[str, list[torch.Tensor]]:
    """Make each layer's MLP channels 48.. copies of channels 0..: their activations equal kept ones exactly.
    Returns the keep set that removes the copies."""
    adapter = get_adapter(model)
    keep = []
    with torch.no_grad():
        for layer in range(adapter.num_layers):
            ins, _ = adapter.mlp_projections(layer)
            width = ins[0].out_features
            copies = torch.arange(width - 16, width)
            for lin in ins:
                lin.weight[copies] = lin.weight[copies - (width - 16) + layer]
            keep.append(torch.arange(width - 16))
    return {"mlp": keep}


def duplicate_kv_group(model) -> dict[str, list[torch.Tensor]]:
    """Make KV group 1 of every layer (its k/v rows and its query heads) a copy of group 0; keep group 0."""
    adapter = get_adapter(model)
    keep = []
    with torch.no_grad():
        for layer in range(adapter.num_layers):
            for s in GROUPS["attention"].slices(adapter, layer)[:3]:  # the rows of q, k and v
                lin, copy_to, copy_from = s.linear, s.indices(torch.tensor([1])), s.indices(torch.tensor([0]))
                lin.weight[copy_to] = lin.weight[copy_from]
                if lin.bias is not None:
                    lin.bias[copy_to] = lin.bias[copy_from]
            keep.append(torch.tensor([0]))
    return {"attention": keep}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group", ["mlp", "attention"])
def test_refit_is_exact_when_removed_channels_are_copies_of_kept_ones(family, group):
    model = tiny_model(family)
    keep = (duplicate_mlp_channels if group == "mlp" else duplicate_kv_group)(model)
    seqs = sequences(8, seed=1)
    dense = logits(model, seqs)
    plain = copy.deepcopy(model)
    apply_mask(plain, keep)
    assert (logits(plain, seqs) - dense).abs().max() > 1e-2     # without the refit the copies' share is lost
    report = refit(model, keep, batches(), damping=0.0, progress=False).report
    apply_mask(model, keep)
    scale = dense.abs().max()
    assert ((logits(model, seqs) - dense).abs().max() / scale) < 1e-5
    assert all(r["kept"] == "refit" and r["error_refit"] < 1e-9 for r in report[group])


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_never_raises_a_layers_calibration_error_above_keeping_the_dense_columns(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    keep = {"mlp": [torch.randperm(GROUPS["mlp"].widths(adapter)[i], generator=torch.Generator().manual_seed(i))[:24]
                    for i in range(adapter.num_layers)],
            "attention": [torch.tensor([1])] * adapter.num_layers}
    data, seqs = batches(), sequences(8, seed=3)
    dense = logits(model, seqs)
    none = copy.deepcopy(model)
    apply_mask(none, keep)
    report = refit(model, keep, data, damping=0.01, progress=False).report
    for group, rows in report.items():
        assert [r["layer"] for r in rows] == list(range(adapter.num_layers))
        for r in rows:
            chosen = r["error_refit"] if r["kept"] == "refit" else r["error_none"]
            assert chosen <= r["error_none"] + 1e-12, (group, r)
        assert sum(r["kept"] == "refit" for r in rows) >= 1
    apply_mask(model, keep)
    # on held-out text too, the refitted model stays closer to the dense one
    assert (logits(model, seqs) - dense).square().mean() < (logits(none, seqs) - dense).square().mean()


def test_first_layer_error_of_the_report_matches_a_direct_measurement():
    """The report's errors come from Gram sums; layer 0 sees the dense inputs, so its 'none' error is the
    relative squared error of the dense down_proj columns kept, measured directly."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    kept = torch.arange(0, 64, 2)
    keep = {"mlp": [kept] * adapter.num_layers}
    data = batches()
    down = adapter.mlp_projections(0)[1]
    xs = []
    handle = down.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in data:
            model(input_ids=b.ids)
    handle.remove()
    num = den = 0.0
    for x, b in zip(xs, data):
        x = x[b.mask].double()
        w = down.weight.detach().double()
        y = x @ w.T
        y_none = x[:, kept] @ w[:, kept].T
        num += b.weight * float((y - y_none).square().sum())
        den += b.weight * float(y.square().sum())
    report = refit(model, keep, data, damping=0.01, progress=False).report
    assert report["mlp"][0]["error_none"] == pytest.approx(num / den, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_obs_choice_removes_the_channels_that_cost_nothing_where_the_mask_did_not(family):
    """Channels 48.. copy 0..15; the mask removes 16..31 (lossy). With a flat prior the pool is the 32
    highest-indexed channels, and the refit-aware choice removes the copies instead: the model stays exact."""
    model = tiny_model(family)
    duplicate_mlp_channels(model)
    adapter = get_adapter(model)
    mask = {"mlp": [torch.cat([torch.arange(16), torch.arange(32, 64)])] * adapter.num_layers}
    priors = {"mlp": torch.zeros(adapter.num_layers, 64)}
    seqs = sequences(8, seed=1)
    dense = logits(model, seqs)
    done = refit(model, mask, batches(), damping=1e-9, priors=priors, progress=False)
    layer_shift = [torch.arange(48) for _ in range(adapter.num_layers)]
    assert [k.tolist() for k in done.keep["mlp"]] == [k.tolist() for k in layer_shift]
    assert all(r["kept"] == "obs" and r["channels_changed"] == 16 for r in done.report["mlp"])
    apply_mask(model, done.keep)
    assert ((logits(model, seqs) - dense).abs().max() / dense.abs().max()) < 1e-5


def test_obs_choice_is_refused_for_attention():
    model = tiny_model("llama")
    keep = {"attention": [torch.tensor([0])] * 3}
    with pytest.raises(ConfigError) as e:
        refit(model, keep, batches(), priors={"attention": torch.zeros(3, 2)}, progress=False)
    assert "mlp only" in e.value.problem and "refit_choose: mask" in e.value.fix


def test_merge_weights_set_each_sources_share_of_the_calibration_tokens():
    sources = {"a": [[5] * 10] * 3, "b": [[6] * 4], "c": [[7] * 9]}
    out = calibration_batches(sources, weights={"a": 3.0, "c": 0}, batch_size=2, pad_id=0)
    share = {}
    for b in out:
        tok = int(b.ids[b.mask][0])
        share[tok] = share.get(tok, 0.0) + b.weight * int(b.mask.sum())
    assert share == pytest.approx({5: 0.75, 6: 0.25})            # c (weight 0) left out; a has 3x b's share


def test_refit_bias_checkpoint_reloads_and_gives_the_same_logits(tmp_path):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    keep = {"mlp": [torch.arange(0, 64, 3)] * adapter.num_layers}
    refit(model, keep, batches(), damping=0.01, bias=True, progress=False)
    apply_mask(model, keep, "uniform")
    assert adapter.mlp_projections(0)[1].bias is not None and adapter.mlp_projections(0)[1].bias.abs().sum() > 0
    save_pruned(model, tiny_tokenizer(), tmp_path / "m", {"recover": "refit_bias"})
    again = load_model(tmp_path / "m")
    seqs = sequences(4, seed=5)
    assert torch.allclose(logits(again, seqs), logits(model, seqs), atol=1e-5)


def tiny_params(**prune) -> dict:
    return {"tasks": ["t1"], "score": {"groups": ["mlp", "attention", "hidden"]}, "prune": prune}


def hidden_keep(width: int = 32, kept: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.sort(torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:kept]).values


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_refit_keeps_the_pruned_model_exact_to_its_reference_and_reloads(family, tmp_path):
    """With residual channels removed the refit solves for the input projections (q, k, v; gate and up, kept only
    where the MLP's output comes closer), the output projections' kept rows (o_proj, down_proj) and an untied
    head. Slicing then still computes what the refitted model computes with the removed
    channels zeroed, the checkpoint reloads to the same logits, no projection's calibration error rises above
    keeping its dense columns, and held-out logits move closer to the dense model's than without the refit."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    kept = hidden_keep()
    removed = torch.tensor([c for c in range(32) if c not in kept])
    keep = {"hidden": [kept], "mlp": [torch.arange(0, 64, 2)] * adapter.num_layers}
    seqs = sequences(8, seed=3)
    dense = logits(model, seqs)
    none = copy.deepcopy(model)
    apply_mask(none, keep)
    report = refit(model, keep, batches(), damping=0.01, progress=False).report
    reference = copy.deepcopy(model)
    GROUPS["hidden"].zero(get_adapter(reference), 0, removed)
    apply_mask(model, keep, "uniform")
    out = logits(model, seqs)
    assert ((out - logits(reference, seqs)).abs().max() / out.abs().max()) < 1e-5
    assert (out - dense).square().mean() < (logits(none, seqs) - dense).square().mean()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    per_layer = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]   # down_proj: reported under mlp
    names = [r["projection"].split(".")[-1] for r in report["hidden"]]
    assert names == per_layer * adapter.num_layers + ([] if tied else ["lm_head"])
    for r in report["hidden"]:   # the MLP's inputs: kept only where the MLP's output comes closer
        if r["projection"].endswith(("gate_proj", "up_proj")):
            assert (r["kept"] == "refit") == (r["output_error_refit"] < r["output_error_none"])
    assert [r["layer"] for r in report["mlp"]] == list(range(adapter.num_layers))
    for r in report["hidden"] + report["mlp"]:
        assert min(r["error_refit"], r["error_none"]) <= r["error_none"] + 1e-12
    assert all(r["kept"] == "refit" for r in report["hidden"] if "output_error_none" not in r)
    save_pruned(model, tiny_tokenizer(), tmp_path / "m", {"recover": "refit"})
    again = load_model(tmp_path / "m")
    assert again.config.hidden_size == 24
    assert torch.allclose(logits(again, seqs), out, atol=1e-5)


@pytest.mark.parametrize("family, group, stock", [("llama", "mlp", "LlamaForCausalLM"),
                                                   ("qwen2", "hidden", "Qwen2ForCausalLM")])
def test_uniform_refit_checkpoint_loads_in_stock_transformers(family, group, stock, tmp_path):
    """A refitted ``uniform`` checkpoint loads in the stock class with the refitted model's logits; with
    ``hidden`` on Qwen2 that covers biased q/k/v (kept as they are) and an untied head (refitted)."""
    import transformers

    model = tiny_model(family)
    layers = get_adapter(model).num_layers
    keep = ({"mlp": [torch.arange(0, 64, 2)] * layers} if group == "mlp"
            else {"hidden": [hidden_keep(seed=1)], "attention": [torch.tensor([0])] * layers})
    refit(model, keep, batches(), progress=False)
    apply_mask(model, keep, "uniform")
    save_pruned(model, tiny_tokenizer(), tmp_path / "m", {"recover": "refit"})
    loaded = getattr(transformers, stock).from_pretrained(tmp_path / "m")
    seqs = sequences(4, seed=6)
    assert type(loaded).__name__ == stock
    assert torch.allclose(logits(loaded, seqs), logits(model, seqs), atol=1e-5)


def test_hidden_refit_is_accepted_in_params():
    params = Params.from_dict(tiny_params(groups=["mlp", "hidden"], recover="refit"))
    assert list(params.prune.groups) == ["mlp", "hidden"] and params.prune.recover == "refit"


def test_a_group_the_refit_cannot_serve_is_refused_naming_what_works():
    from diet.config import check_refit_groups

    with pytest.raises(ConfigError) as e:
        check_refit_groups(["mlp", "experts"])
    assert "experts" in e.value.problem and "prune.groups: ['mlp']" in e.value.fix


def test_obs_choice_without_a_refit_is_refused():
    with pytest.raises(ConfigError) as e:
        Params.from_dict(tiny_params(recover="bias", refit_choose="obs"))
    assert "refit_choose: obs" in e.value.problem and "prune.recover: refit" in e.value.fix


@pytest.mark.parametrize("key,value", [("refit_damping", -0.1), ("refit_samples", 0), ("refit_choose", "best")])
def test_out_of_range_refit_settings_are_refused(key, value):
    with pytest.raises(ConfigError) as e:
        Params.from_dict(tiny_params(recover="refit", **{key: value}))
    assert key in e.value.problem and e.value.fix


def test_the_refit_is_the_same_bytes_at_any_thread_count():
    """Batches run several at once (diet.parallel) and the sums run in batch order: 1 and 3 threads agree."""
    out = {}
    for threads in (1, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model = tiny_model("gemma2")
            keep = {"mlp": [torch.arange(0, 64, 2)] * 3, "attention": [torch.tensor([1])] * 3}
            refit(model, keep, batches(40), progress=False)
            out[threads] = {k: v.clone() for k, v in model.state_dict().items()}
        finally:
            torch.set_num_threads(before)
    assert all(torch.equal(out[1][k], out[3][k]) for k in out[1])
