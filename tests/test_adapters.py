"""The adapter interface on every supported family: registry, structure, costs, hooks, keep validation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from diet.adapters import PRUNED, SUPPORTED, adapter_class, family, get_adapter, pruned_model_type
from diet.adapters.base import ModelAdapter
from diet.groups import GROUPS as GROUP_RULES
from diet.errors import ModelError
from diet.pruning import apply_mask
from diet.geometry import parameter_counts
from diet.biases import output_bias_groups
from diet.groups import GROUPS, get_group
from diet.keep import check_keep, layer_widths
from tests.tiny import FAMILIES, tiny_model

NEEDS_BOS = {"llama": False, "gemma2": True, "gemma3_text": True, "qwen2": False, "mistral": False}



def run_with_hooks(model, hooks) -> None:
    """One forward pass of a (2, 7) batch with ``hooks`` registered, removed afterwards."""
    try:
        with torch.no_grad():
            model(torch.randint(4, 128, (2, 7)))
    finally:
        for h in hooks:
            h.remove()

def test_registry_covers_the_supported_families_lazily():
    assert set(SUPPORTED) == set(FAMILIES)
    assert all(":" in target for target in SUPPORTED.values())
    assert PRUNED == {f"diet_{f}": f for f in FAMILIES}
    assert all(family(pruned_model_type(f)) == f for f in FAMILIES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_get_adapter_dispatches_on_model_type(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    assert isinstance(adapter, ModelAdapter) and adapter.model is model
    assert adapter.model_type == model_type == model.config.model_type
    assert type(adapter) is adapter_class(model_type)
    assert adapter.needs_bos is NEEDS_BOS[model_type]
    # a per-layer-width model of the family keeps its adapter
    apply_mask(model, {"mlp": [torch.arange(w) for w in (8, 16, 24)]}, "global")
    assert model.config.model_type == f"diet_{model_type}"
    assert type(get_adapter(model)) is adapter_class(model_type)


def test_unsupported_model_type_names_the_supported_ones():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ModelError) as err:
        get_adapter(gpt2)
    message = str(err.value)
    assert "gpt2" in message and all(f in message for f in FAMILIES)
    with pytest.raises(ModelError, match="model_type"):
        get_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_structure_views(model_type):
    adapter = get_adapter(tiny_model(model_type))
    assert adapter.num_layers == 3
    assert adapter.head_dim() == 8
    assert [adapter.num_heads(i) for i in range(3)] == [4, 4, 4]
    assert [adapter.num_kv_heads(i) for i in range(3)] == [2, 2, 2]
    assert adapter.heads_per_group(0) == 2
    assert GROUPS["mlp"].widths(adapter) == [64, 64, 64]
    assert GROUPS["attention"].widths(adapter) == [2, 2, 2]
    assert GROUPS["hidden"].widths(adapter) == [32]  # one mask row shared by every layer
    assert layer_widths(adapter) == {"intermediate_size": [64] * 3, "num_attention_heads": [4] * 3,
                                      "num_key_value_heads": [2] * 3, "hidden_size": [32]}
    ins, down = adapter.mlp_projections(1)
    assert [p.out_features for p in ins] == [64, 64] and down.in_features == 64
    q, k, v, o = adapter.attention_projections(1)
    assert (q.out_features, k.out_features, v.out_features, o.in_features) == (32, 16, 16, 32)
    with pytest.raises(ValueError):
        get_group("embedding")
    norms = [*adapter.residual_norms(1), *adapter.branch_norms(1), adapter.final_norm()]
    assert len(norms) == (5 if model_type.startswith("gemma") else 3)
    assert all(n.weight.shape == (32,) for n in norms) and len({id(n) for n in norms}) == len(norms)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_activation_module_inputs_have_the_group_width(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    seen = {}
    run_with_hooks(model, [GROUPS[g].output_projection(adapter, 2).register_forward_hook(
        lambda m, inp, out, g=g: seen.__setitem__(g, tuple(inp[0].shape))) for g in ("mlp", "attention")])
    assert seen == {"mlp": (2, 7, 64), "attention": (2, 7, 4 * 8)}  # (B, T, I_l), (B, T, n_heads_l * head_dim)


@pytest.mark.parametrize("group", ["mlp", "attention"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_dimension_cost_is_what_removing_one_dimension_saves(model_type, group):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    cost = GROUPS[group].cost(adapter, 1)
    before = parameter_counts(model)["per_layer"]
    widths = GROUPS[group].widths(adapter)
    keep = {group: [torch.arange(w) if i != 1 else torch.arange(1, w) for i, w in enumerate(widths)]}
    apply_mask(model, keep, "global")
    after = parameter_counts(model)["per_layer"]
    assert [b - a for b, a in zip(before, after)] == [0, cost, 0]


def test_dimension_cost_counts_biases():
    # qwen2: q/k/v biases, no o_proj bias; llama: no biases. hidden 32, head_dim 8, 2 query heads per group.
    assert GROUPS["attention"].cost(get_adapter(tiny_model("llama")), 0) == 8 * (2 * 32 + 32 + 32) + 2 * 8 * 32
    assert GROUPS["attention"].cost(get_adapter(tiny_model("qwen2")), 0) == 8 * (2 * 33 + 33 + 33) + 2 * 8 * 32
    assert GROUPS["mlp"].cost(get_adapter(tiny_model("qwen2")), 0) == 32 + 32 + 32


def test_attention_slices_follow_repeat_kv_grouping():
    adapter = get_adapter(tiny_model("llama"))  # head_dim 8, 2 query heads per KV head
    q, k, v, o = GROUPS["attention"].slices(adapter, 0)
    assert (q.axis, k.axis, v.axis, o.axis) == ("out", "out", "out", "in")
    group = torch.tensor([1])
    assert k.indices(group).tolist() == v.indices(group).tolist() == list(range(8, 16))
    assert q.indices(group).tolist() == o.indices(group).tolist() == list(range(16, 32))


@pytest.mark.parametrize("keep, problem", [
    ({"embedding": [torch.arange(32)] * 3}, "unknown dimension group"),
    ({"hidden": [torch.arange(32)] * 3}, "one mask row for all layers"),
    ({"mlp": [torch.arange(8)] * 2}, "2 layers"),
    ({"mlp": [torch.arange(8), torch.tensor([], dtype=torch.long), torch.arange(8)]}, "keeps nothing"),
    ({"mlp": [torch.tensor([0, 0, 1])] * 3}, "twice"),
    ({"attention": [torch.tensor([0, 2])] * 3}, "outside"),
])
def test_bad_keep_sets_are_refused(keep, problem):
    model = tiny_model("llama")
    with pytest.raises(ModelError, match=problem):
        apply_mask(model, keep)
    assert GROUPS["mlp"].widths(get_adapter(model)) == [64] * 3  # untouched


def test_check_keep_sorts_and_accepts_lists():
    adapter = get_adapter(tiny_model("llama"))
    keep = check_keep(adapter, {"mlp": [[5, 1, 3], torch.tensor([2]), (0,)]})
    assert [k.tolist() for k in keep["mlp"]] == [[1, 3, 5], [2], [0]]
    assert all(k.dtype == torch.long for k in keep["mlp"])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bias_flags_match_what_stock_transformers_builds(model_type):
    """A flag in BIAS_FLAGS gives every projection of its group a bias in the stock model; a group without a
    flag has no output bias in the stock model."""
    flags = adapter_class(model_type).BIAS_FLAGS
    plain = get_adapter(tiny_model(model_type))
    assert output_bias_groups(plain) == []
    flagged = get_adapter(tiny_model(model_type, **{flag: True for flag in flags.values()}))
    for group in (g for g, rule in GROUPS.items() if rule.recoverable):  # the groups with an output projection
        for layer in range(flagged.num_layers):
            projections = GROUPS[group].projections(flagged, layer)
            if group in flags:
                assert all(p.bias is not None for p in projections)
            else:
                assert projections[-1].bias is None
    assert output_bias_groups(flagged) == [g for g in GROUPS if g in flags]


PER_LAYER_GROUPS = [g for g, rule in GROUP_RULES.items() if len(rule.per_layer_fields)]


@pytest.mark.parametrize("group", PER_LAYER_GROUPS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_group_rules_agree_with_the_weights(model_type, group):
    """The contract every dimension group keeps (diet/groups.py), on every family: removing one dimension of a
    layer removes exactly ``cost`` parameters, the config widths it predicts are those read back, and its
    activation's channels map onto its dimensions."""
    model = tiny_model(model_type, num_attention_heads=8, num_key_value_heads=4)
    adapter = get_adapter(model)
    rule = GROUP_RULES[group]
    widths = rule.widths(adapter)
    assert len(widths) == adapter.num_layers and min(widths) > 1
    for layer in range(adapter.num_layers):
        out = rule.output_projection(adapter, layer)
        assert rule.projections(adapter, layer)[-1] is out
        blocks = rule.channel_blocks(adapter, layer)
        assert out.in_features == widths[layer] if blocks is None else (blocks == widths[layer]
                                                                         and out.in_features % blocks == 0)
        assert rule.weight_norms(adapter, layer).shape == rule.magnitude(adapter, layer).shape == (widths[layer],)
        dims = torch.tensor([widths[layer] - 1])
        assert rule.output_channels(adapter, layer, dims).numel() == out.in_features // widths[layer]
    kept = [torch.arange(1, w) for w in widths]  # each layer loses its first dimension
    predicted = rule.config_widths(adapter, kept)
    before = parameter_counts(adapter.model)['decoder']
    cost = sum(rule.cost(adapter, i) for i in range(adapter.num_layers))
    for layer, k in enumerate(kept):
        rule.slice(adapter, layer, k)
    assert before - parameter_counts(adapter.model)['decoder'] == cost
    assert rule.config_widths(adapter) == predicted
    assert rule.widths(adapter) == [w - 1 for w in widths]


def test_group_registry_follows_the_config_names():
    from diet.config import GROUPS as NAMES

    assert tuple(GROUP_RULES) == NAMES
    assert all(rule.name == name for name, rule in GROUP_RULES.items())
    attention = GROUP_RULES["attention"]
    assert "single KV head" in attention.unprunable_reason([1, 1]) and attention.unprunable_reason([2, 1]) is None


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hidden_group_rules_agree_with_the_weights(model_type):
    """The hidden group's contract: one row; removing a residual channel removes ``cost`` decoder parameters
    (and a column of the embedding, of an untied head and an entry of the final norm); a removed residual channel
    and a removed MLP channel or KV group share exactly ``crossing`` parameters; its activation sites see (B, T, H)."""
    from diet.api import geometry
    from diet.budget import removed_params

    model = tiny_model(model_type, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    adapter = get_adapter(model)
    rule = GROUP_RULES["hidden"]
    assert rule.widths(adapter) == [32] and not rule.recoverable and rule.per_layer_keep(model.config) is None
    assert rule.weight_norms(adapter, 0).shape == rule.magnitude(adapter, 0).shape == (32,)
    sites = rule.activation_sites(adapter, 0)
    assert len(sites) == 2 * adapter.num_layers + 1 and sites[-1] is adapter.final_norm()
    seen = []
    run_with_hooks(model, [m.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape))) for m in sites])
    assert seen == [(2, 7, 32)] * len(sites)
    geo = geometry(model, ("mlp", "attention", "hidden"))
    assert set(geo.crossings) == {"hidden"} and set(geo.crossings["hidden"]) == {"mlp", "attention"}
    assert geo.crossings["hidden"]["mlp"] == [3] * 3                       # gate[j, c], up[j, c], down[c, j]
    assert geo.crossings["hidden"]["attention"] == [8 * (2 + 1 + 1 + 2)] * 3  # q, k, v rows and o columns of a group
    before = parameter_counts(model)
    keep = {"hidden": [torch.arange(1, 32)], "mlp": [torch.arange(w) if i != 1 else torch.arange(1, w)
                                                     for i, w in enumerate(geo.widths["mlp"])],
            "attention": [torch.arange(w) if i != 2 else torch.arange(1, w) for i, w in enumerate(geo.widths["attention"])]}
    assert rule.config_widths(adapter, keep["hidden"]) == {"hidden_size": [31]}
    apply_mask(model, keep, "global")
    after = parameter_counts(model)
    dropped = {"hidden": [1], "mlp": [0, 1, 0], "attention": [0, 0, 1]}
    expected = removed_params(dropped, geo.costs, geo.crossings)
    assert expected == geo.costs["hidden"][0] + geo.costs["mlp"][1] + geo.costs["attention"][2] - 3 - 48
    assert before["decoder"] - after["decoder"] == expected
    assert before["embedding"] - after["embedding"] == 2 * 128                # embedding and untied head columns
    assert before["total"] - after["total"] == expected + 2 * 128 + 1         # and the final norm's entry
    assert rule.config_widths(adapter) == {"hidden_size": [31]} and model.config.hidden_size == 31


def test_a_group_the_family_cannot_prune_is_refused_from_the_config(monkeypatch, tmp_path):
    """A family whose adapter does not prune a group: geometry_from_folder refuses it with a ConfigError naming
    the key and the groups it prunes, reading the config only."""
    from diet.errors import ConfigError
    from diet.geometry import geometry_from_folder

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not read")  # no weight is read
    monkeypatch.setattr(adapter_class("llama"), "PRUNABLE_GROUPS", ("mlp", "attention"))
    with pytest.raises(ConfigError) as e:
        geometry_from_folder(tmp_path / "m", ("mlp", "hidden"))
    assert "hidden" in e.value.problem and "llama" in e.value.problem and e.value.fix == "set prune.groups to ['mlp']"
