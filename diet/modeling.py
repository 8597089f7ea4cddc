"""The classes of pruned checkpoints, and the config update that makes a sliced model describe its weights
(``write_config``); reading, writing and loading checkpoint folders is ``diet.checkpoint``.

Two formats, chosen by the widths the mask leaves (``write_config``):

* **uniform** (same widths in every layer): a stock config with ``intermediate_size``,
  ``num_attention_heads``, ``num_key_value_heads`` and ``hidden_size`` updated and ``head_dim`` explicit. Plain transformers
  (and other runtimes) load it without this package.
* **per-layer** (widths differ, ``layout: global``): for each family ``<f>`` a config subclass with model_type
  ``diet_<f>`` holding ``intermediate_sizes``, ``num_heads_per_layer`` and ``num_kv_heads_per_layer``, and a
  causal-LM subclass that builds every layer at its own widths. Its config.json writes those widths in
  transformers' own schema for heterogeneous layers, ``per_layer_config`` (``transformers.integrations.
  heterogeneity``): ``{"0": {"intermediate_size": ..., "num_attention_heads": ..., "num_key_value_heads": ...},
  ...}``, every layer listed, keys zero-padded as transformers writes them (``layer_overrides``); the config
  reads that schema and the lists of earlier checkpoints alike (``read_layer_overrides``). A per-layer config
  whose widths are all equal (output biases, or head counts stock validation refuses) keeps the lists. Importing ``diet.modeling`` registers both with
  ``AutoConfig`` / ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(path)`` works without
  remote code (each pruned folder's README.md says so). ``hidden_size`` is one width for every layer in both
  formats: pruning the ``hidden`` group sets it to the kept width (Gemma scales embeddings by its square root;
  ``diet.groups.HiddenGroup`` folds that change into the weights). The scalar width fields hold the widest layer, so every layer is built that wide and
  then sliced to its listed width (on the meta device when loading, so nothing is allocated twice). Attention
  reshapes with ``-1`` heads and removing whole KV groups keeps ``num_attention_heads // num_key_value_heads``,
  so the stock forward and the KV cache handle a different head count in every layer.

Output biases (``prune.recover: bias``, ``diet.adapters.base``): a family whose stock config can give the
biased projection a bias (Llama: ``mlp_bias``, ``attention_bias``; Gemma-2/3: ``attention_bias``) stays stock;
otherwise (Gemma-2/3 MLP, Qwen2 MLP and o_proj) the per-layer config lists the groups in ``output_biases`` and
the per-layer model gives those output projections a bias, even when the widths are uniform.

A pruned model switches between the stock and the per-layer classes in place (``retype``): the per-layer
classes add nothing but the three lists, so every module keeps its weights and its reference to the config.
"""

from __future__ import annotations

import copy

import transformers
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.heterogeneity import HeterogeneousConfigMixin

from diet.adapters import SUPPORTED, adapter_class, family, get_adapter, pruned_model_type
from diet.biases import carry_output_biases, ensure_output_biases
from diet.groups import GROUPS, PER_LAYER_FIELDS  # PER_LAYER_FIELDS: stock width field -> per-layer list field
from diet.keep import layer_widths, slice_model


#: per-layer config field: groups whose output projection carries a bias that no stock flag expresses
OUTPUT_BIASES_FIELD = "output_biases"
_PER_LAYER_ONLY = (*PER_LAYER_FIELDS.values(), OUTPUT_BIASES_FIELD)

#: family model_type -> {"stock": (config class, model class), "per_layer": (config class, model class)}
CLASSES: dict[str, dict[str, tuple[type, type]]] = {}


def _validate_per_layer(config) -> None:
    """Replaces the stock check ``hidden_size % num_attention_heads == 0``: head_dim is explicit here."""
    n = config.num_hidden_layers
    for scalar, field in PER_LAYER_FIELDS.items():
        values = getattr(config, field)
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"{field} has {len(values)} entries for {n} layers")
        if min(values) <= 0 or max(values) != getattr(config, scalar):
            raise ValueError(f"{field} must be positive with its maximum equal to {scalar}")
    for group in GROUPS.values():
        problem = group.per_layer_config_problem(config)
        if problem:
            raise ValueError(problem)
    unknown = [g for g in (getattr(config, OUTPUT_BIASES_FIELD) or []) if g not in GROUPS]
    if unknown:
        raise ValueError(f"{OUTPUT_BIASES_FIELD} lists unknown groups {unknown}; known: {list(GROUPS)}")


def read_layer_overrides(config, overrides) -> None:
    """Set the per-layer lists of ``config`` from a ``per_layer_config`` mapping (layer index, an int or its
    string, -> overrides of the stock width fields); a layer or field it leaves out has the global width.

    Any override but the widths of ``PER_LAYER_FIELDS`` (``skip``, ``sliding_window``) would change a layer in a
    way these classes do not build: a ValueError. The global fields become the widest layer's.
    """
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"per_layer_config must map layer indices to width overrides, got {overrides!r}")
    n = config.num_hidden_layers
    layers: dict[int, dict] = {}
    for key, fields in overrides.items():
        index = key if isinstance(key, int) else int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= index < n:
            raise ValueError(f"per_layer_config key {key!r} is not a layer index below num_hidden_layers = {n}")
        if not isinstance(fields, dict) or set(fields) - set(PER_LAYER_FIELDS):
            raise ValueError(f"per_layer_config[{key!r}] = {fields!r}: these classes read only the widths "
                             f"{', '.join(PER_LAYER_FIELDS)}")
        layers[index] = fields
    for scalar, field in PER_LAYER_FIELDS.items():
        if not any(scalar in fields for fields in layers.values()):
            continue
        values = [layers.get(i, {}).get(scalar, getattr(config, scalar)) for i in range(n)]
        listed = getattr(config, field)
        if listed is not None and list(listed) != values:
            raise ValueError(f"per_layer_config gives {scalar} per layer {values}, {field} {list(listed)}")
        setattr(config, field, values)
        setattr(config, scalar, max(values))


def layer_overrides(config, d: dict) -> dict:
    """``d`` (a ``to_dict`` of ``config``) with its per-layer lists written as ``per_layer_config``, every layer
    and every listed field explicit; unchanged when the lists give every layer the same widths."""
    lists = {scalar: d[field] for scalar, field in PER_LAYER_FIELDS.items() if d.get(field) is not None}
    if all(len(set(values)) == 1 for values in lists.values()):
        return d
    for field in PER_LAYER_FIELDS.values():
        d.pop(field, None)
    n = config.num_hidden_layers
    digits = len(str(n - 1))  # zero-padded as transformers writes them, so the keys sort numerically
    d["per_layer_config"] = {str(i).zfill(digits): {scalar: values[i] for scalar, values in lists.items()}
                             for i in range(n)}
    return d


def _shape_layers(model) -> None:
    """Slice a freshly built model (every layer at the widest widths) to the per-layer widths of its config."""
    config = model.config
    keep = {name: kept for name, group in GROUPS.items() if (kept := group.per_layer_keep(config)) is not None}
    adapter = get_adapter(model)
    slice_model(adapter, keep)
    ensure_output_biases(adapter, getattr(config, OUTPUT_BIASES_FIELD) or [])


def _define(model_type: str) -> None:
    adapter = adapter_class(model_type)
    stock_config = getattr(transformers, adapter.config_class_name)
    stock_model = getattr(transformers, adapter.model_class_name)

    @strict(accept_kwargs=True)
    class PerLayerConfig(stock_config):
        intermediate_sizes: list[int] | None = None
        num_heads_per_layer: list[int] | None = None
        num_kv_heads_per_layer: list[int] | None = None
        output_biases: list[str] | None = None

        def validate_architecture(self):
            _validate_per_layer(self)

        def to_dict(self):
            return layer_overrides(self, super().to_dict())

        # transformers' HeterogeneousConfigMixin turns per_layer_config into per-layer configs whose global
        # widths raise on access (the stock layers read them); here it fills the lists instead
        per_layer_config = property(HeterogeneousConfigMixin.per_layer_config.fget, read_layer_overrides)

    PerLayerConfig.model_type = pruned_model_type(model_type)

    class PerLayerForCausalLM(stock_model):
        config_class = PerLayerConfig

        def __init__(self, config):
            super().__init__(config)
            _shape_layers(self)

    for cls, stock in ((PerLayerConfig, stock_config), (PerLayerForCausalLM, stock_model)):
        cls.__name__ = cls.__qualname__ = f"Diet{stock.__name__}"
        cls.__module__ = __name__
        globals()[cls.__name__] = cls
    AutoConfig.register(PerLayerConfig.model_type, PerLayerConfig, exist_ok=True)
    AutoModelForCausalLM.register(PerLayerConfig, PerLayerForCausalLM, exist_ok=True)
    CLASSES[model_type] = {"stock": (stock_config, stock_model), "per_layer": (PerLayerConfig, PerLayerForCausalLM)}


for _model_type in SUPPORTED:
    _define(_model_type)


def is_per_layer(model_or_config) -> bool:
    """Whether a model (or config) is of a registered ``diet_<family>`` type."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type != family(config.model_type)


def retype(model, per_layer: bool) -> None:
    """Switch ``model`` and its config, in place, to its family's per-layer or stock classes."""
    classes = CLASSES[family(model.config.model_type)]
    config_class, model_class = classes["per_layer" if per_layer else "stock"]
    config = model.config
    if not per_layer:
        for field in _PER_LAYER_ONLY:
            config.__dict__.pop(field, None)
    config.__dict__.pop("model_type", None)  # a config read from config.json holds it per instance
    config.__class__ = config_class
    model.__class__ = model_class


def write_config(model) -> None:
    """Make the config of a sliced ``model`` describe its weights.

    Uniform widths that stock transformers accepts give a stock config (``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads``; ``head_dim`` stays explicit). Otherwise the model and
    config become the registered ``diet_<family>`` types that also carry the per-layer lists; their scalar
    fields hold the widest layer.
    """
    adapter = get_adapter(model)
    widths = layer_widths(adapter)
    unflagged = carry_output_biases(adapter)
    uniform = all(len(set(v)) == 1 for v in widths.values())
    per_layer = not uniform or bool(unflagged) or stock_config_problem(model.config, widths) is not None
    retype(model, per_layer=per_layer)
    for name, values in widths.items():
        setattr(model.config, name, max(values))
        if per_layer and name in PER_LAYER_FIELDS:  # hidden_size is one width for every layer: no list
            setattr(model.config, PER_LAYER_FIELDS[name], list(values))
    if per_layer:
        setattr(model.config, OUTPUT_BIASES_FIELD, unflagged or None)


def stock_config_problem(config, widths: dict[str, list[int]]) -> str | None:
    """Why the stock config of ``config``'s family with these widths would not load (None if it would)."""
    uneven = [name for name, values in widths.items() if len(set(values)) != 1]
    if uneven:
        return f"{', '.join(uneven)} differ per layer"
    stock = copy.deepcopy(config)
    for field in _PER_LAYER_ONLY:
        stock.__dict__.pop(field, None)
    stock.__class__ = CLASSES[family(config.model_type)]["stock"][0]
    try:
        for name, values in widths.items():
            setattr(stock, name, values[0])
        stock.validate()
    except Exception as e:  # strict-dataclass validation errors carry the reason
        return str(e).strip().splitlines()[-1].strip()
    return None


def __getattr__(name: str):
    """``diet.modeling.load_model`` and ``load_model_and_tokenizer``, which the model cards of pruned folders cite:
    they live in ``diet.checkpoint``."""
    if name in ("load_model", "load_model_and_tokenizer"):
        from diet import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
