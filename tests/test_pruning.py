"""Contract suite for physical pruning, run on every supported family.

The central property: a physically pruned model's logits equal those of the dense model with the same
dimensions zeroed, in memory, after saving and reloading, and while generating.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from diet.adapters import adapter_class, get_adapter
from diet.errors import ModelError
from diet.modeling import PER_LAYER_FIELDS, is_per_layer
from diet.checkpoint import load_model, save_pruned
from diet.pruning import apply_mask, zero_mask
from diet.geometry import parameter_counts
from diet.slicing import slice_linear
from diet.groups import GROUPS
from diet.keep import layer_widths
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

GROUP_SETS = {"mlp": ("mlp",), "attention": ("attention",), "both": ("mlp", "attention"), "hidden": ("hidden",),
              "hidden+mlp": ("hidden", "mlp"), "all": ("mlp", "attention", "hidden")}
ATOL, RTOL = 1e-5, 1.3e-6  # float32 (torch.testing's defaults for float32)


def random_keep(model, groups, layout: str, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Random kept indices; ``global`` gives every layer a different width, ``uniform`` the same one."""
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    keep = {}
    for group in groups:
        widths = GROUPS[group].widths(adapter)
        if group == "hidden":  # one row for all layers; a multiple of the head count keeps the config stock
            heads = model.config.num_attention_heads
            counts = [heads * int(torch.randint(1, widths[0] // heads, (1,), generator=g))]
        elif layout == "uniform":
            counts = [int(torch.randint(1, widths[0], (1,), generator=g))] * len(widths)
        elif group == "mlp":
            counts = torch.randperm(widths[0] - 1, generator=g)[: len(widths)].add(1).tolist()  # distinct
        else:  # 2 KV groups per layer: widths 1 and 2 both occur
            counts = [1, 2, 1][: len(widths)]
        keep[group] = [torch.randperm(w, generator=g)[:k] for w, k in zip(widths, counts)]
    return keep


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits  # (B, T, V)


def load_kwargs(family: str) -> dict:
    attn = adapter_class(family).attn_implementation
    return {"attn_implementation": attn} if attn else {}


def check_metadata(model) -> None:
    """Every Linear's features match its weight, and the config's widths match the weights."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
    adapter = get_adapter(model)
    widths = layer_widths(adapter)
    config = model.config
    d = adapter.head_dim()
    hidden = adapter.hidden_size()
    assert config.hidden_size == hidden == widths["hidden_size"][0]
    assert model.get_input_embeddings().embedding_dim == hidden
    head = model.get_output_embeddings()
    assert head.in_features == head.weight.shape[1] == hidden
    norms = [adapter.final_norm()] + [n for i in range(adapter.num_layers)
                                      for n in (*adapter.residual_norms(i), *adapter.branch_norms(i))]
    assert all(n.weight.shape == (hidden,) for n in norms)
    for i in range(adapter.num_layers):
        q, k, v, o = adapter.attention_projections(i)
        assert q.out_features == o.in_features == widths["num_attention_heads"][i] * d
        assert k.out_features == v.out_features == widths["num_key_value_heads"][i] * d
        assert q.in_features == k.in_features == v.in_features == o.out_features == hidden
        ins, down = adapter.mlp_projections(i)
        assert all(p.out_features == down.in_features for p in ins)
        assert all(p.in_features == hidden for p in ins) and down.out_features == hidden
        assert adapter.decoder_layers()[i].mlp.intermediate_size == down.in_features
    for scalar, field in PER_LAYER_FIELDS.items():
        if is_per_layer(model):
            assert getattr(config, field) == widths[scalar]
            assert getattr(config, scalar) == max(widths[scalar])
        else:
            assert len(set(widths[scalar])) == 1 and getattr(config, scalar) == widths[scalar][0]
            assert field not in config.to_dict()
    assert config.head_dim == d
    config.validate()


def prune_exactly(model, keep, layout, n_ids=None):
    """Apply ``keep`` and check the pruned logits equal the dense model's with the removed dimensions zeroed
    (and differ from the dense ones); returns the pruned model, the input ids, the reference logits and the
    parameter counts before pruning."""
    ids = input_ids() if n_ids is None else input_ids(n_ids)
    dense, reference = logits(model, ids), logits(zero_mask(model, keep), ids)
    before = parameter_counts(model)
    pruned = apply_mask(model, keep, layout)
    out = logits(pruned, ids)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=RTOL)
    assert (out - dense).abs().max() > 1e-2  # the removed dimensions did matter
    check_metadata(pruned)
    return pruned, ids, reference, before


@pytest.mark.parametrize("layout", ["global", "uniform"])
@pytest.mark.parametrize("groups", list(GROUP_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_zeroed_dense(family, groups, layout):
    model = tiny_model(family)
    seed = 2 * list(GROUP_SETS).index(groups) + (layout == "uniform")
    keep = random_keep(model, GROUP_SETS[groups], layout, seed=seed)
    removed, embedding_removed = removed_by(model, keep)

    pruned, ids, reference, before = prune_exactly(model, keep, layout)

    assert is_per_layer(pruned) == (layout == "global" and groups != "hidden")  # hidden alone: one width
    after = parameter_counts(pruned)
    assert before["decoder"] - after["decoder"] == removed > 0
    assert before["embedding"] - after["embedding"] == embedding_removed
    final_norm = before["total"] - before["embedding"] - before["decoder"]    # the final norm, outside the layers
    hidden_removed = final_norm - (after["total"] - after["embedding"] - after["decoder"])
    assert before["total"] - after["total"] == removed + embedding_removed + hidden_removed


def removed_by(model, keep) -> tuple[int, int]:
    """(decoder parameters, embedding parameters) that pruning to ``keep`` removes, from the geometry's costs:
    a parameter shared by a removed residual channel and a removed MLP channel or KV group counts once."""
    from diet.api import geometry
    from diet.budget import removed_params

    geo = geometry(model, tuple(keep))
    dropped = {g: [w - len(k) for w, k in zip(geo.widths[g], per_row)] for g, per_row in keep.items()}
    embedding = 0
    if "hidden" in keep:  # the embedding (and an untied head) loses a column per residual channel
        embedding = parameter_counts(model)["embedding"] // geo.widths["hidden"][0] * dropped["hidden"][0]
    return removed_params(dropped, geo.costs, geo.crossings), embedding


@pytest.mark.parametrize("groups", list(GROUP_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_global_checkpoint_reloads_through_auto_classes(family, groups, tmp_path):
    model = tiny_model(family)
    keep = random_keep(model, GROUP_SETS[groups], "global", seed=3)
    ids = input_ids(1)
    reference = logits(zero_mask(model, keep), ids)
    apply_mask(model, keep, "global")
    save_pruned(model, tiny_tokenizer(), tmp_path / "pruned", {"sparsity": 0.2})

    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == (family if groups == "hidden" else f"diet_{family}")
    assert config["hidden_size"] == get_adapter(model).hidden_size()
    assert config["architectures"] == [type(model).__name__]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", **load_kwargs(family)).eval()
    assert type(reloaded) is type(model)
    check_metadata(reloaded)
    torch.testing.assert_close(logits(reloaded, ids), reference, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


_STOCK_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    jobs = json.loads(sys.argv[1])
    ids = torch.load(jobs["ids"])
    for path, kwargs in jobs["models"]:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        with torch.no_grad():
            torch.save({"logits": model(ids).logits, "model_type": model.config.model_type}, path + "/out.pt")
    assert not [m for m in sys.modules if m == "diet" or m.startswith("diet.")]
""")


@pytest.fixture(scope="module")
def stock_reloads(tmp_path_factory):
    """Uniform checkpoints of every family and group set, reloaded by a process that never imports diet."""
    root = tmp_path_factory.mktemp("uniform")
    ids = input_ids(2)
    torch.save(ids, root / "ids.pt")
    cases, jobs = {}, []
    for family in FAMILIES:
        for groups in GROUP_SETS:
            model = tiny_model(family, seed=5)
            keep = random_keep(model, GROUP_SETS[groups], "uniform", seed=7)
            reference = logits(zero_mask(model, keep), ids)
            apply_mask(model, keep, "uniform")
            path = save_pruned(model, tiny_tokenizer(), root / f"{family}-{groups}", {})
            cases[family, groups] = (path, reference, model.config.model_type)
            jobs.append([str(path), load_kwargs(family)])
    env = {**os.environ, "PYTHONPATH": ""}
    request = json.dumps({"ids": str(root / "ids.pt"), "models": jobs})
    proc = subprocess.run([sys.executable, "-c", _STOCK_LOADER, request],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases


@pytest.mark.parametrize("groups", list(GROUP_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_checkpoint_loads_in_plain_transformers(stock_reloads, family, groups):
    path, reference, model_type = stock_reloads[family, groups]
    assert model_type == family
    out = torch.load(path / "out.pt")
    assert out["model_type"] == family
    torch.testing.assert_close(out["logits"], reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_pruned_models(family, tmp_path):
    model = tiny_model(family, seed=2)
    keep = random_keep(model, ("mlp", "attention"), "global", seed=11)
    reference = zero_mask(model, keep)
    apply_mask(model, keep, "global")
    prompt = input_ids(3)[:1, :6]
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **settings)
    assert expected.shape == (1, 14)
    assert torch.equal(model.generate(prompt, **settings), expected)
    save_pruned(model, None, tmp_path / "m", {})
    reloaded = load_model(tmp_path / "m")
    assert torch.equal(reloaded.generate(prompt, **settings), expected)  # KV cache with per-layer head counts


def test_pruning_twice_returns_to_a_stock_model_when_widths_even_out():
    model = tiny_model("llama")
    apply_mask(model, {"mlp": [torch.arange(w) for w in (20, 40, 64)]}, "global")
    assert is_per_layer(model) and model.config.intermediate_sizes == [20, 40, 64]
    ids = input_ids()
    keep = {"mlp": [torch.arange(8) for _ in range(3)]}
    reference = logits(zero_mask(model, keep), ids)
    apply_mask(model, keep, "uniform")
    assert not is_per_layer(model) and type(model).__name__ == "LlamaForCausalLM"
    assert model.config.intermediate_size == 8
    check_metadata(model)
    torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=RTOL)


def test_uniform_layout_refuses_uneven_widths_before_touching_the_model():
    model = tiny_model("qwen2")
    before = parameter_counts(model)
    keep = random_keep(model, ("mlp",), "global")
    with pytest.raises(ModelError, match="uniform"):
        apply_mask(model, keep, "uniform")
    assert parameter_counts(model) == before


def test_uniform_layout_refuses_head_counts_stock_transformers_rejects(tmp_path):
    # hidden 24 with 6 heads: keeping 5 heads in every layer is uniform but 24 % 5 != 0 fails stock validation
    model = tiny_model("llama", hidden_size=24, num_attention_heads=6, num_key_value_heads=6, head_dim=4)
    keep = {"attention": [torch.tensor([0, 1, 2, 3, 5])] * 3}
    with pytest.raises(ModelError, match="not a multiple"):
        apply_mask(model, keep, "uniform")
    ids = input_ids()
    reference = logits(zero_mask(model, keep), ids)
    apply_mask(model, keep, "global")
    assert is_per_layer(model) and model.config.num_heads_per_layer == [5, 5, 5]
    save_pruned(model, None, tmp_path / "m", {})
    torch.testing.assert_close(logits(load_model(tmp_path / "m"), ids), reference, atol=ATOL, rtol=RTOL)


def test_per_layer_config_builds_its_model_and_validates_its_lists():
    model = tiny_model("gemma3_text")
    apply_mask(model, random_keep(model, ("mlp", "attention"), "global"), "global")
    config = model.config
    built = AutoModelForCausalLM.from_config(config)  # real tensors, not the meta device of from_pretrained
    assert type(built) is type(model)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    check_metadata(built)
    config_class = type(config)
    fields = config.to_dict()  # the lists alone, as checkpoints written before per_layer_config hold them
    fields.pop("model_type")
    fields.pop("per_layer_config")
    fields.update({field: getattr(config, field) for field in PER_LAYER_FIELDS.values()}, intermediate_sizes=[8, 16])
    with pytest.raises(Exception, match="3 layers"):
        config_class(**fields)
    fields.update(intermediate_sizes=config.intermediate_sizes, num_heads_per_layer=[3, 4, 2])
    with pytest.raises(Exception, match="query heads per KV head"):
        config_class(**fields)


def test_unknown_layout_is_refused():
    with pytest.raises(ModelError, match="layout"):
        apply_mask(tiny_model("llama"), {}, "ragged")


def test_save_pruned_writes_a_complete_checkpoint(tmp_path):
    model = tiny_model("llama")
    apply_mask(model, random_keep(model, ("mlp",), "global"), "global")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    tok = tiny_tokenizer()
    save_pruned(model, tok, out, {"sparsity": 0.2, "tasks": ["arc_easy"]})

    assert not (out / "stale.txt").exists()  # replaced whole
    assert (out / "model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparsity"] == 0.2 and manifest["tasks"] == ["arc_easy"]
    ckpt = manifest["checkpoint"]
    assert ckpt["model_type"] == "diet_llama" and ckpt["stock_loadable"] is False
    assert ckpt["widths"]["intermediate_size"] == model.config.intermediate_sizes
    assert ckpt["parameters"] == parameter_counts(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary leftovers
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("the fox").input_ids == tok("the fox").input_ids
    reloaded = load_model(out)
    assert reloaded.config.tie_word_embeddings is True
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_save_pruned_records_untied_heads(tmp_path):
    model = tiny_model("qwen2")
    save_pruned(model, None, tmp_path / "m", {})
    reloaded = load_model(tmp_path / "m")
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()


def test_load_model_uses_family_attention_and_dtype(tmp_path):
    model = tiny_model("gemma2")
    apply_mask(model, random_keep(model, ("mlp", "attention"), "global"), "global")
    save_pruned(model, None, tmp_path / "m", {})
    loaded = load_model(tmp_path / "m", dtype="bfloat16")
    assert loaded.config._attn_implementation == "eager"
    assert not loaded.training
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_slice_linear_keeps_rows_columns_and_metadata():
    torch.manual_seed(0)
    lin = nn.Linear(5, 6)
    x = torch.randn(3, 5)  # (B, in)
    full = lin(x)  # (B, out)
    rows = torch.tensor([0, 2, 5])
    slice_linear(lin, rows, "out")
    assert (lin.out_features, lin.in_features) == (3, 5) and lin.bias.shape == (3,)
    torch.testing.assert_close(lin(x), full[:, rows])

    lin = nn.Linear(5, 6, bias=False)
    cols = torch.tensor([1, 4])
    expected = x[:, cols] @ lin.weight[:, cols].T  # (B, out)
    assert slice_linear(lin, cols, "in") is lin
    assert (lin.out_features, lin.in_features) == (6, 2) and lin.weight.shape == (6, 2)
    torch.testing.assert_close(lin(x[:, cols]), expected)
    with pytest.raises(ValueError):
        slice_linear(lin, cols, "rows")


def test_parameter_counts_count_tied_weights_once():
    tied, untied = tiny_model("llama"), tiny_model("qwen2")
    for model, heads in ((tied, 1), (untied, 2)):
        counts = parameter_counts(model)
        assert counts["embedding"] == heads * 128 * 32
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["non_embedding"] == counts["total"] - counts["embedding"]
        assert counts["decoder"] == sum(counts["per_layer"]) == sum(p.numel() for layer in get_adapter(model).decoder_layers() for p in layer.parameters())
        assert len(counts["per_layer"]) == 3


# -- recovery: removed channels held at their calibration means ------------------------------------------------------
def random_means(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-channel means of each output projection's input, {group: (L, D)}, far enough from 0 to matter."""
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    return {group: torch.randn(adapter.num_layers, GROUPS[group].output_projection(adapter, 0).in_features, generator=g)
            for group in ("mlp", "attention")}


CALIBRATION = ["the quick brown fox jumps over the lazy dog", "question: which gas do plants take in? answer: carbon",
               "pack my box with five dozen liquor jugs, then count 0 1 2 3"]


def calibration_means(model) -> dict[str, torch.Tensor]:
    """The per-channel means the scoring pass records on a few texts, {group: (L, D)}."""
    from diet.scorefile import split_scores
    from diet.scoring import score_texts

    tensors, _ = score_texts(model, tiny_tokenizer(), CALIBRATION, groups=["mlp", "attention"], statistic="mean_abs",
                             weight_norm=False, batch_size=2, max_length=32, add_bos=True, progress=False)
    return {g: m["mean"] for g, m in split_scores(tensors)[1].items()}


def removed_channels(model, group: str, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Input channels of the output projection that the removed dimensions own (written out independently)."""
    config = model.config
    width = config.intermediate_size if group == "mlp" else config.num_key_value_heads
    removed = torch.tensor(sorted(set(range(width)) - set(kept.tolist())), dtype=torch.long)
    if group == "mlp":
        return removed
    per_group = config.num_attention_heads // config.num_key_value_heads * config.head_dim  # channels per KV group
    return (removed[:, None] * per_group + torch.arange(per_group)).flatten()


@torch.no_grad()
def held_at_means_logits(model, keep, means, ids) -> torch.Tensor:
    """Dense logits with every removed channel of down_proj / o_proj's input overwritten by its mean."""
    adapter = get_adapter(model)
    handles = []

    def hook(channels, mean):
        def pre(module, args):
            x = args[0].clone()                                   # (B, T, D)
            x[..., channels] = mean[channels]
            return (x,)
        return pre

    try:
        for group, per_layer in keep.items():
            for layer, kept in enumerate(per_layer):
                module = GROUPS[group].output_projection(adapter, layer)
                channels = removed_channels(model, group, layer, kept)
                handles.append(module.register_forward_pre_hook(hook(channels, means[group][layer])))
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


#: family -> whether a uniform checkpoint with output biases of both groups is a stock one
STOCK_WITH_BIASES = {"llama": True, "gemma2": False, "gemma3_text": False, "qwen2": False, "mistral": False}


@pytest.mark.parametrize("layout", ["global", "uniform"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bias_recovery_equals_dense_with_removed_channels_at_their_means(family, layout, tmp_path):
    model = tiny_model(family, seed=4)
    keep = random_keep(model, ("mlp", "attention"), layout, seed=13)
    means = calibration_means(model)
    ids = input_ids(4)
    reference = held_at_means_logits(model, keep, means, ids)
    zeroed = logits(zero_mask(model, keep), ids)

    apply_mask(model, keep, layout, means=means)

    out = logits(model, ids)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=RTOL)
    assert (out - zeroed).abs().max() > 1e-2  # the means did matter
    check_metadata(model)
    assert is_per_layer(model) == (layout == "global" or not STOCK_WITH_BIASES[family])
    save_pruned(model, tiny_tokenizer(), tmp_path / "m", {})
    reloaded = load_model(tmp_path / "m")
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize("family, groups", [("llama", ("mlp", "attention")), ("gemma2", ("attention",)),
                                            ("gemma3_text", ("attention",))])
def test_bias_recovery_uniform_checkpoint_loads_in_the_stock_class(family, groups, tmp_path):
    model = tiny_model(family, seed=6)
    keep = random_keep(model, groups, "uniform", seed=2)
    means = random_means(model, seed=3)
    ids = input_ids(5)
    reference = held_at_means_logits(model, keep, means, ids)
    apply_mask(model, keep, "uniform", means=means)
    assert not is_per_layer(model)
    save_pruned(model, None, tmp_path / "m", {})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == family and "output_biases" not in config
    stock_class = getattr(__import__("transformers"), adapter_class(family).model_class_name)
    stock, info = stock_class.from_pretrained(tmp_path / "m", output_loading_info=True, **load_kwargs(family))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(stock.eval(), ids), reference, atol=ATOL, rtol=RTOL)


def test_bias_recovery_refuses_bad_means_before_touching_the_model():
    model = tiny_model("qwen2")
    keep = random_keep(model, ("mlp", "attention"), "global")
    means = random_means(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_inputs = [
        ({"mlp": means["mlp"]}, "attention has none"),
        ({**means, "attention": means["attention"][:, :-1]}, "shape"),
        ({**means, "mlp": means["mlp"][:2]}, "shape"),
        ({**means, "mlp": torch.full_like(means["mlp"], float("nan"))}, "NaN"),
    ]
    for bad, message in bad_inputs:
        with pytest.raises(ModelError, match=message):
            apply_mask(model, keep, "global", means=bad)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- masks selected with per-group constraints (select.multiple / select.min_keep per group) ---------------------
PER_GROUP_SELECT = {"multiple": {"mlp": 8, "attention": 1}, "min_keep": {"mlp": 0.05, "attention": 0.25}}
#: (query heads, KV heads, tied head): 2 query heads per KV head with a tied head, 4 per KV head untied
GQA_SHAPES = {"gqa2-tied": (8, 4, True), "gqa4-untied": (8, 2, False)}
#: share of decoder parameters removed: attention holds about half of the tiny models' decoder parameters
SPARSITY = {("attention",): 0.2, ("mlp", "attention"): 0.3}


@pytest.mark.parametrize("layout", ["global", "uniform"])
@pytest.mark.parametrize("shape", list(GQA_SHAPES))
@pytest.mark.parametrize("groups", list(SPARSITY), ids=["attention", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_group_selection_removes_whole_kv_groups_exactly(family, groups, shape, layout, tmp_path):
    """multiple {mlp: 8, attention: 1}: selection removes whole KV groups (with their query heads) while MLP widths
    stay multiples of 8, and the pruned model (in memory and reloaded) equals the dense one with them zeroed."""
    from diet.api import geometry, plan
    from diet.config import PruneConfig, SelectConfig

    heads, kv, tied = GQA_SHAPES[shape]
    # hidden 48: every kept head count (k KV groups x heads per group) divides it, as stock configs demand
    model = tiny_model(family, hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv,
                       tie_word_embeddings=tied)
    adapter = get_adapter(model)
    geo = geometry(model)
    g = torch.Generator().manual_seed(7)
    task_scores = {t: {grp: torch.rand(len(w), max(w), generator=g) for grp, w in geo.widths.items()}
                   for t in ("t1", "t2", "t3")}                                       # each (L, W)
    select_cfg = SelectConfig(**PER_GROUP_SELECT, layout=layout)
    _, mask = plan(task_scores, geo, prune_cfg=PruneConfig(sparsity=SPARSITY[groups], groups=groups),
                   select_cfg=select_cfg)

    assert set(mask.keep) == set(groups)
    assert sum(mask.widths["attention"]) < kv * adapter.num_layers                  # whole KV groups went
    assert min(mask.widths["attention"]) >= 1
    if "mlp" in groups:
        assert all(w % 8 == 0 for w in mask.widths["mlp"]) and sum(mask.widths["mlp"]) < 64 * adapter.num_layers
    assert mask.multiple == {g_: PER_GROUP_SELECT["multiple"][g_] for g_ in groups}
    keep = mask.keep_tensors()

    model, ids, reference, before = prune_exactly(model, keep, layout, 2)

    heads_kept = [k * heads // kv for k in mask.widths["attention"]]                 # whole groups of query heads
    assert [adapter.num_heads(i) for i in range(adapter.num_layers)] == heads_kept
    assert before["decoder"] - parameter_counts(model)["decoder"] == mask.removed
    save_pruned(model, tiny_tokenizer(), tmp_path / "pruned", {"mask": mask.summary()})
    reloaded = load_model(tmp_path / "pruned")
    uneven = any(len(set(widths)) > 1 for widths in mask.widths.values())
    assert is_per_layer(reloaded) == uneven and (layout == "global" or not uneven)  # even widths: a stock config
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    torch.testing.assert_close(logits(reloaded, ids), reference, atol=ATOL, rtol=RTOL)


# -- the hidden group: residual channels, one mask for every layer -------------------------------------------------
def test_rms_norm_fold_over_fewer_channels_is_exact():
    """The fold HiddenGroup.slice relies on (docs/method.md): with the residual scaled by a = sqrt(k / H), an
    RMSNorm over the k kept channels with the same eps and gain / a gives the dense norm over all H channels of a
    vector that is zero elsewhere; for Gemma's gain (1 + w): 1 + w' = (1 + w) / a."""
    g = torch.Generator().manual_seed(0)
    H, k, eps = 12, 5, 1e-2  # a large eps: the fold must not depend on it being small
    kept = torch.tensor([0, 3, 4, 8, 11])
    x = torch.zeros(3, H, dtype=torch.float64)
    x[:, kept] = torch.randn(3, k, generator=g, dtype=torch.float64) * 0.05   # (B, H), zero off the kept channels
    w = torch.randn(H, generator=g, dtype=torch.float64)

    def rms(v, gain):
        return v / torch.sqrt(v.square().mean(-1, keepdim=True) + eps) * gain

    a = (k / H) ** 0.5
    dense = rms(x, w)[:, kept]
    torch.testing.assert_close(rms(a * x[:, kept], w[kept] / a), a * dense / a, rtol=1e-12, atol=0)
    gemma_dense = rms(x, 1 + w)[:, kept]
    w_folded = (1 + w[kept]) / a - 1
    torch.testing.assert_close(rms(a * x[:, kept], 1 + w_folded), gemma_dense, rtol=1e-12, atol=0)
    # without the residual scale, folding eps instead (eps * H / k, gain * sqrt(H / k)) is also exact
    eps_k = eps * H / k
    folded = x[:, kept] / torch.sqrt(x[:, kept].square().mean(-1, keepdim=True) + eps_k) * w[kept] * (H / k) ** 0.5
    torch.testing.assert_close(folded, dense, rtol=1e-12, atol=0)


HIDDEN_SETS = {"hidden": ("hidden",), "hidden+mlp": ("hidden", "mlp"), "all": ("hidden", "mlp", "attention")}
#: sparsity per set: each group's own fraction must pass 1/4 for the hidden group to drop its block of 24 of 48
#: (with shared weights counted once, hidden+mlp at 0.4 removes about 0.29 of each group's own parameters)
HIDDEN_SPARSITY = {"hidden": 0.3, "hidden+mlp": 0.4, "all": 0.5}
#: hidden 48 with 8 query heads: a kept width of 24 divides every kept head count, as stock configs demand
HIDDEN_SELECT = {"multiple": {"mlp": 8, "attention": 1, "hidden": 24},
                 "min_keep": {"mlp": 0.05, "attention": 0.25, "hidden": 0.05}}


@pytest.mark.parametrize("layout", ["global", "uniform"])
@pytest.mark.parametrize("shape", list(GQA_SHAPES))
@pytest.mark.parametrize("groups", list(HIDDEN_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_selection_prunes_exactly_and_reloads(family, groups, shape, layout, tmp_path):
    """Masks selected with the hidden group (alone, with mlp, with mlp and attention): the pruned model equals
    the dense one with those residual channels (and dimensions) zeroed, in memory and reloaded; the mask's
    parameter accounting is the checkpoint's, every shared weight counted once."""
    from diet.api import geometry, plan
    from diet.config import PruneConfig, SelectConfig

    heads, kv, tied = GQA_SHAPES[shape]
    model = tiny_model(family, hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv,
                       tie_word_embeddings=tied, seed=1)
    geo = geometry(model)
    g = torch.Generator().manual_seed(11)
    task_scores = {t: {grp: torch.rand(len(w), max(w), generator=g) for grp, w in geo.widths.items()}
                   for t in ("t1", "t2", "t3")}                                        # each (rows, W)
    _, mask = plan(task_scores, geo, prune_cfg=PruneConfig(sparsity=HIDDEN_SPARSITY[groups],
                                                           groups=HIDDEN_SETS[groups]),
                   select_cfg=SelectConfig(**HIDDEN_SELECT, layout=layout))
    assert len(mask.keep["hidden"]) == 1 and mask.widths["hidden"] == [24]
    keep = mask.keep_tensors()

    model, ids, reference, before = prune_exactly(model, keep, layout, 6)

    after = parameter_counts(model)
    assert before["decoder"] - after["decoder"] == mask.removed
    assert after["embedding"] == before["embedding"] // 2                           # 24 of 48 columns kept
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    save_pruned(model, tiny_tokenizer(), tmp_path / "pruned", {"mask": mask.summary()})
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["checkpoint"]["widths"]["hidden_size"] == [24]
    assert manifest["checkpoint"]["parameters"]["total"] == after["total"]
    reloaded = load_model(tmp_path / "pruned")
    assert reloaded.config.hidden_size == 24
    uneven = any(len(set(widths)) > 1 for widths in mask.widths.values())
    assert is_per_layer(reloaded) == uneven
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    torch.testing.assert_close(logits(reloaded, ids), reference, atol=ATOL, rtol=RTOL)


#: family -> whether its stock config demands hidden_size % num_attention_heads == 0 (Qwen2's does not)
STOCK_NEEDS_HEADS_TO_DIVIDE_HIDDEN = {"llama": True, "gemma2": True, "gemma3_text": True, "qwen2": False,
                                      "mistral": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_width_that_stock_configs_refuse(family, tmp_path):
    """A kept hidden width that is no multiple of the head count: stock configs that demand one refuse it, so
    layout uniform is refused before the model is touched, and layout global writes the per-layer type, exact
    after reload."""
    model = tiny_model(family, seed=3)
    keep = {"hidden": [torch.arange(30)]}                                              # 30 % 4 heads != 0
    refused = STOCK_NEEDS_HEADS_TO_DIVIDE_HIDDEN[family]
    before = parameter_counts(model)
    if refused:
        with pytest.raises(ModelError, match="hidden") as e:
            apply_mask(model, keep, "uniform")
        assert "select.multiple" in e.value.fix
        assert parameter_counts(model) == before
    ids = input_ids(7)
    reference = logits(zero_mask(model, keep), ids)
    apply_mask(model, keep, "global")
    assert is_per_layer(model) == refused and model.config.hidden_size == 30
    save_pruned(model, None, tmp_path / "m", {})
    torch.testing.assert_close(logits(load_model(tmp_path / "m"), ids), reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_hidden_pruned_models(family, tmp_path):
    model = tiny_model(family, seed=2)
    keep = random_keep(model, ("hidden", "mlp", "attention"), "global", seed=12)
    reference = zero_mask(model, keep)
    apply_mask(model, keep, "global")
    prompt = input_ids(3)[:1, :6]
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, **settings), expected)
    save_pruned(model, None, tmp_path / "m", {})
    assert torch.equal(load_model(tmp_path / "m").generate(prompt, **settings), expected)


def test_bias_recovery_refuses_the_hidden_group_before_touching_the_model():
    model = tiny_model("llama")
    keep = random_keep(model, ("mlp", "hidden"), "global")
    means = {**random_means(model), "hidden": torch.zeros(1, 32)}
    before = parameter_counts(model)
    with pytest.raises(ModelError, match="hidden"):
        apply_mask(model, keep, "global", means=means)
    assert parameter_counts(model) == before
