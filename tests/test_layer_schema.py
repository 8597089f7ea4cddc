"""Per-layer widths in transformers' own schema (``per_layer_config``), on tiny random models of every family.

A ``global`` checkpoint writes its widths as ``per_layer_config``; the ``diet_<family>`` classes read it and the
per-layer lists of checkpoints written before it. What stock transformers does with such a config under the
family's own model_type is measured here, on the pinned version, because each model card states it
(``diet.cards.stock_on_layer_config``).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

from diet.adapters import adapter_class, get_adapter
from diet.cards import STOCK_MEASURED_ON
from diet.errors import ModelError
from diet.modeling import PER_LAYER_FIELDS, write_config
from diet.checkpoint import load_model, save_pruned
from diet.pruning import apply_mask
from diet.biases import ensure_output_biases
from diet.keep import layer_widths
from tests.test_pruning import input_ids, load_kwargs, logits, random_keep
from tests.tiny import FAMILIES, tiny_model

GROUP_SETS = {"mlp": ("mlp",), "mlp+attention": ("mlp", "attention")}


def pruned_folder(family, groups, tmp_path, seed=3):
    model = tiny_model(family)
    apply_mask(model, random_keep(model, GROUP_SETS[groups], "global", seed=seed), "global")
    path = tmp_path / "pruned"
    save_pruned(model, None, path, {"mask": {"layout": "global"}})
    return model, path


def read(path):
    return json.loads((path / "config.json").read_text())


def write(path, config):
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("groups", list(GROUP_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_global_checkpoint_writes_per_layer_config_and_reloads(family, groups, tmp_path):
    model, path = pruned_folder(family, groups, tmp_path)
    widths = layer_widths(get_adapter(model))
    config = read(path)
    assert config["model_type"] == f"diet_{family}"
    assert not set(PER_LAYER_FIELDS.values()) & set(config)  # the lists are gone from the file
    layers = config["per_layer_config"]
    assert list(layers) == ["0", "1", "2"]
    assert {scalar: [layers[k][scalar] for k in layers] for scalar in PER_LAYER_FIELDS} == \
        {scalar: widths[scalar] for scalar in PER_LAYER_FIELDS}
    assert all(config[scalar] == max(widths[scalar]) for scalar in PER_LAYER_FIELDS)  # the widest layer
    ids = input_ids(1)
    for reloaded in (AutoModelForCausalLM.from_pretrained(path, **load_kwargs(family)).eval(), load_model(path)):
        assert type(reloaded) is type(model)
        assert layer_widths(get_adapter(reloaded)) == widths
        torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_in_the_old_list_form_still_loads(family, tmp_path):
    model, path = pruned_folder(family, "mlp+attention", tmp_path)
    config = read(path)
    layers = config.pop("per_layer_config")
    for scalar, field in PER_LAYER_FIELDS.items():  # what checkpoints written before per_layer_config hold
        config[field] = [layers[k][scalar] for k in sorted(layers)]
    write(path, config)
    reloaded = load_model(path)
    assert reloaded.config.intermediate_sizes == model.config.intermediate_sizes
    ids = input_ids(1)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)
    save_pruned(reloaded, None, tmp_path / "again", {})  # written again: the new form
    again = read(tmp_path / "again")
    assert again["per_layer_config"] == layers and "intermediate_sizes" not in again


def test_a_sparse_per_layer_config_gives_the_other_layers_the_global_width(tmp_path):
    """transformers itself writes only the layers (and fields) that differ from the global config."""
    model, path = pruned_folder("llama", "mlp", tmp_path)
    config = read(path)
    sizes = [config["per_layer_config"][k]["intermediate_size"] for k in ("0", "1", "2")]
    widest = sizes.index(max(sizes))
    config["per_layer_config"] = {str(i): {"intermediate_size": s} for i, s in enumerate(sizes) if i != widest}
    write(path, config)
    reloaded = load_model(path)
    assert reloaded.config.intermediate_sizes == sizes and reloaded.config.num_heads_per_layer is None
    ids = input_ids(1)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("damage, needle", [
    (lambda c: c["per_layer_config"].update({"3": {"intermediate_size": 8}}), "key '3' is not a layer index below num_hidden_layers = 3"),
    (lambda c: c["per_layer_config"]["0"].update(skip=["mlp"]), "these classes read only the widths"),
    (lambda c: c["per_layer_config"].update({"x": {}}), "key 'x' is not a layer index"),
    (lambda c: c.update(intermediate_sizes=[8, 8, 8]), "intermediate_sizes [8, 8, 8]"),  # the two forms disagree
], ids=["index", "skip", "key", "both-forms"])
def test_a_damaged_per_layer_config_is_refused_with_the_fix(damage, needle, tmp_path):
    _, path = pruned_folder("llama", "mlp", tmp_path)
    config = read(path)
    damage(config)
    write(path, config)
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert needle in e.value.problem and "rewrite the pruned checkpoint" in e.value.fix
    assert e.value.artifact == "pruned_model"


@pytest.mark.parametrize("groups", list(GROUP_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_what_stock_transformers_does_with_the_schema(family, groups, tmp_path):
    """Under the family's own model_type, stock transformers reads the schema but refuses to build the model
    (what the model card says, measured on ``STOCK_MEASURED_ON``): it never builds the global widths."""
    model, path = pruned_folder(family, groups, tmp_path)
    config = read(path)
    config["model_type"] = family
    config.pop("output_biases", None)
    write(path, config)
    widths = layer_widths(get_adapter(model))
    heads_differ = len(set(widths["num_attention_heads"])) > 1
    config_refuses = heads_differ and adapter_class(family).stock_config_checks_heads  # not Qwen2's, Mistral's
    if config_refuses:
        with pytest.raises(AmbiguousGlobalPerLayerAttributeError, match="num_attention_heads"):
            AutoConfig.from_pretrained(path)
    else:
        stock = AutoConfig.from_pretrained(path)
        assert stock.is_heterogeneous and type(stock).__name__ != type(model.config).__name__
        for scalar in PER_LAYER_FIELDS:  # the schema says what this package means
            assert [getattr(c, scalar) for c in stock.per_layer_config] == widths[scalar]
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError,
                       match="num_attention_heads" if heads_differ else "intermediate_size"):
        AutoModelForCausalLM.from_pretrained(path)
    assert STOCK_MEASURED_ON  # the version the card names; rerun this test when the pin moves


def test_model_card_states_the_schema_and_what_stock_transformers_does(tmp_path):
    _, path = pruned_folder("llama", "mlp+attention", tmp_path)
    card = (path / "README.md").read_text()
    assert "`per_layer_config`" in card and f"transformers {STOCK_MEASURED_ON}" in card
    assert "AmbiguousGlobalPerLayerAttributeError" in card and "`model_type` set to `llama`" in card
    assert "the one change this folder needs" in card


def test_output_biases_stay_a_diet_field_and_the_card_says_so(tmp_path):
    model = tiny_model("qwen2")
    apply_mask(model, random_keep(model, ("mlp",), "global", seed=3), "global")
    ensure_output_biases(get_adapter(model), ["mlp"])
    write_config(model)
    save_pruned(model, None, tmp_path / "m", {})
    config = read(tmp_path / "m")
    assert config["output_biases"] == ["mlp"] and "per_layer_config" in config
    assert "keeps needing `diet`" in (tmp_path / "m" / "README.md").read_text()
    ids = input_ids(1)
    torch.testing.assert_close(logits(load_model(tmp_path / "m"), ids), logits(model, ids), atol=0, rtol=0)


def test_uniform_widths_keep_the_list_form(tmp_path):
    """A per-layer config whose widths are all equal (here: output biases Gemma-2 has no flag for) is written as
    before: its checkpoints do not change."""
    model = tiny_model("gemma2")
    apply_mask(model, {"mlp": [torch.arange(40)] * 3}, "uniform")
    ensure_output_biases(get_adapter(model), ["mlp"])
    write_config(model)
    save_pruned(model, None, tmp_path / "m", {})
    config = read(tmp_path / "m")
    assert "per_layer_config" not in config and config["intermediate_sizes"] == [40, 40, 40]
    assert "per_layer_config" not in (tmp_path / "m" / "README.md").read_text()
