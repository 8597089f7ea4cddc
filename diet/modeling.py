"""Loadable pruned checkpoints.

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
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.heterogeneity import HeterogeneousConfigMixin

from diet.adapters import PRUNED, SUPPORTED, adapter_class, family, get_adapter, pruned_model_type
from diet.adapters.base import parameter_counts
from diet.cards import pruned_card
from diet.devices import device_counts, plan_placement, resolve_device, weight_bytes
from diet.errors import ModelError
from diet.groups import GROUPS, PER_LAYER_FIELDS  # PER_LAYER_FIELDS: stock width field -> per-layer list field
from diet.io import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)

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
    adapter.slice_weights(keep)
    adapter.ensure_output_biases(getattr(config, OUTPUT_BIASES_FIELD) or [])


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
    widths = adapter.layer_widths()
    unflagged = adapter.carry_output_biases()
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


def save_pruned(model, tokenizer, out_dir: str | os.PathLike, manifest: dict, provenance: dict | None = None) -> Path:
    """Write ``model`` (safetensors + config), ``tokenizer`` and ``manifest.json`` to ``out_dir`` atomically.

    ``config.tie_word_embeddings`` is set from the weights right before saving, so a tied head is stored once
    and re-tied on load. ``manifest.json`` holds ``manifest`` plus a ``checkpoint`` entry: model_type, whether
    stock transformers loads it, the per-layer widths and the parameter counts. ``README.md`` (a model card,
    ``diet.cards``; ``provenance`` is the base model's ``diet_source.json``) says what it is and how to load it.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    model.config.tie_word_embeddings = out is None or out.weight is inp.weight
    adapter = get_adapter(model)
    checkpoint = {
        "model_type": model.config.model_type,
        "stock_loadable": not is_per_layer(model),
        "widths": adapter.layer_widths(),
        "head_dim": adapter.head_dim(),
        "parameters": parameter_counts(model),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "manifest.json", {**manifest, "checkpoint": checkpoint})
        written = model.config.to_dict()
        write_text(tmp / "README.md", pruned_card(checkpoint["model_type"], family(checkpoint["model_type"]),
                                                  checkpoint["stock_loadable"], manifest, provenance,
                                                  layer_schema="per_layer_config" in written,
                                                  output_biases=bool(written.get(OUTPUT_BIASES_FIELD))))
    return out_dir


MODEL_FIX = ("run `dvc repro model` to materialise the base model (models/base), or `dvc repro prune` for the "
             "pruned one (models/pruned)")
PRUNED_FIX = "run `dvc repro prune` to rewrite the pruned checkpoint"
LOAD_HINT = ("import diet.modeling before AutoModelForCausalLM.from_pretrained(path) (it registers the per-layer "
             "classes), or load with diet.modeling.load_model(path)")


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1].strip() if text else ''}"


def read_config(path: str | os.PathLike):
    """The config of a checkpoint folder, checked before transformers sees it (ModelError naming the fix).

    Catches what transformers would report misleadingly: a missing folder (a hub repo-id error), a model_type
    it does not know or whose per-layer classes are not registered (an "upgrade Transformers" message), and
    per-layer width lists that do not match the number of layers.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist", MODEL_FIX)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"no model checkpoint at {path} (config.json missing)", MODEL_FIX)
    raw = _read_json(config_path, MODEL_FIX)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{config_path} names no model_type", MODEL_FIX)
    if model_type.startswith("diet_") and model_type not in PRUNED:
        raise ModelError(f"{path} is a per-layer-width checkpoint of model_type {model_type!r}, which this version "
                         f"of diet does not define (it defines {', '.join(PRUNED)})",
                         "load it with the diet version that pruned it, or rerun `dvc repro prune` with this one")
    if model_type not in CONFIG_MAPPING:
        if model_type in PRUNED:
            raise ModelError(f"{path} has per-layer widths (model_type {model_type!r}) but the diet classes are not "
                             f"registered with transformers", LOAD_HINT)
        raise ModelError(f"{config_path}: model_type {model_type!r} is unknown to transformers "
                         f"{transformers.__version__}",
                         f"use a checkpoint of a supported family ({', '.join(SUPPORTED)}), or upgrade "
                         "transformers if the model is newer than it; then rerun `dvc repro model`")
    family(model_type)  # a transformers model without a diet adapter: ModelError naming the supported ones
    if model_type in PRUNED:
        _check_layer_lists(raw, config_path)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - strict config validation raises several types
        raise ModelError(f"{config_path} does not validate: {_last_line(e)}",
                         PRUNED_FIX if model_type in PRUNED else MODEL_FIX) from None


def _read_json(path: Path, fix: str):
    """A checkpoint's JSON file, or a ModelError naming it and ``fix``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON (truncated?): {e}", fix) from None


def _check_layer_lists(raw: dict, config_path: Path) -> None:
    n = raw.get("num_hidden_layers")
    for field in PER_LAYER_FIELDS.values():
        values = raw.get(field)
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, int) and v > 0 for v in values):
            raise ModelError(f"{config_path}: {field} must be a list of positive integers, got {values!r}", PRUNED_FIX)
        if len(values) != n:
            raise ModelError(f"{config_path}: {field} lists {len(values)} widths for num_hidden_layers = {n}",
                             PRUNED_FIX)


def config_widths(config) -> dict[str, list[int]]:
    """Per-layer widths a config describes, keyed like ``ModelAdapter.layer_widths``."""
    n = config.num_hidden_layers
    return {scalar: list(getattr(config, field, None) or [getattr(config, scalar)] * n)
            for scalar, field in PER_LAYER_FIELDS.items()}


def read_manifest(path: str | os.PathLike, config) -> dict:
    """``manifest.json`` of a pruned checkpoint, checked against its config (model_type, per-layer widths)."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"pruned checkpoint {path} has no manifest.json", PRUNED_FIX)
    manifest = _read_json(manifest_path, PRUNED_FIX)
    checkpoint = manifest.get("checkpoint") if isinstance(manifest, dict) else None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in ("model_type", "widths", "parameters")):
        raise ModelError(f"{manifest_path} lacks its 'checkpoint' entry (model_type, widths, parameters)", PRUNED_FIX)
    if checkpoint["model_type"] != config.model_type:
        raise ModelError(f"{manifest_path} describes a {checkpoint['model_type']!r} checkpoint, config.json a "
                         f"{config.model_type!r} one", PRUNED_FIX)
    widths = config_widths(config)
    stated = checkpoint["widths"] if isinstance(checkpoint["widths"], dict) else {}
    for name, values in widths.items():
        if stated.get(name) != values:
            raise ModelError(f"{manifest_path} gives {name} per layer {stated.get(name)}, config.json {values}",
                             PRUNED_FIX)
    return manifest


def _check_parameters(path: Path, manifest: dict, model) -> None:
    stated = (manifest["checkpoint"].get("parameters") or {}).get("total")
    total = parameter_counts(model)["total"]
    if stated != total:
        raise ModelError(f"{path / 'manifest.json'} counts {stated} parameters, the loaded weights {total}",
                         PRUNED_FIX)


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", *, pruned: bool | None = None,
               device: str | torch.device = "cpu"):
    """Load a stock or pruned checkpoint folder as a causal LM in eval mode, with the family's attention,
    where ``device`` (a ``model.device`` setting) puts it (``plan_placement``: the device is checked before
    anything is read, the model's size against the GPUs' memory from its config, before any weight is read).

    Every problem of the folder is a ModelError naming the command that rewrites it. A pruned checkpoint
    (``pruned=True``, a per-layer model_type, or a folder holding manifest.json) must carry a manifest that
    agrees with its config and its parameter count.
    """
    resolve_device(device)
    path = Path(path)
    config = read_config(path)
    if pruned is None:
        pruned = is_per_layer(config) or (path / "manifest.json").exists()
    manifest = read_manifest(path, config) if pruned else None
    adapter = adapter_class(config.model_type)
    kwargs = {"attn_implementation": adapter.attn_implementation} if adapter.attn_implementation else {}
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    placement = plan_placement(device, lambda: weight_bytes(config, torch_dtype))
    if placement.spread:
        kwargs.update(device_map="auto", max_memory=placement.max_memory)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing or mismatched weight files raise several types
        raise ModelError(f"cannot load the weights of {path}: {_last_line(e)}",
                         PRUNED_FIX if pruned else MODEL_FIX) from None
    if manifest is not None:
        _check_parameters(path, manifest, model)
    if placement.spread:
        log.info("%s: %s (device map: %s)", path, placement.describe(), device_counts(model))
        return model.eval()
    if placement.device.type != "cpu":
        log.info("%s: on %s", path, placement.device)
    return model.to(placement.device).eval()


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                             device: str | torch.device = "cpu"):
    """A saved checkpoint folder (base or pruned) on ``device`` and its tokenizer, each checked when read."""
    from transformers import AutoTokenizer

    model = load_model(path, dtype=dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a missing or damaged tokenizer raises several types
        raise ModelError(f"cannot load the tokenizer of {path}: {_last_line(e)}",
                         PRUNED_FIX if (Path(path) / "manifest.json").exists() else MODEL_FIX) from None
    return model, tokenizer
