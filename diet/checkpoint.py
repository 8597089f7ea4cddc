"""Checkpoint folders: writing a pruned one, and reading and loading any, each problem a ModelError naming the fix.

A folder holds safetensors, ``config.json``, the tokenizer and, for a pruned model, ``manifest.json`` (what the
pipeline did, and a ``checkpoint`` entry: model_type, whether stock transformers loads it, the per-layer widths
and the parameter counts) and ``README.md`` (a model card, ``diet.cards``). Reading checks the config before
transformers sees it, and a pruned folder's manifest against its config and its weights. The classes of
per-layer-width checkpoints are ``diet.modeling``'s (importing this module registers them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from diet.adapters import PRUNED, SUPPORTED, adapter_class, family, get_adapter
from diet.cards import pruned_card
from diet.devices import device_counts, plan_placement, resolve_device, weight_bytes
from diet.errors import ModelError
from diet.geometry import parameter_counts
from diet.groups import PER_LAYER_FIELDS  # stock width field -> per-layer list field
from diet.io import atomic_dir, write_json, write_text
from diet.keep import layer_widths
from diet.modeling import OUTPUT_BIASES_FIELD, is_per_layer

log = logging.getLogger(__name__)


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
        "widths": layer_widths(adapter),
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


#: the fix of a model folder that may be either model, and of a pruned one (``DietError`` keywords)
MODEL_FIX = {"fix": "materialise the base model again (models/base), or rewrite the pruned checkpoint if the folder "
                    "is the pruned one (models/pruned)", "artifact": "checkpoint"}
PRUNED_FIX = {"fix": "rewrite the pruned checkpoint", "artifact": "pruned_model"}
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
        raise ModelError(f"model folder {path} does not exist", **MODEL_FIX)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"no model checkpoint at {path} (config.json missing)", **MODEL_FIX)
    raw = _read_json(config_path, MODEL_FIX)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{config_path} names no model_type", **MODEL_FIX)
    if model_type.startswith("diet_") and model_type not in PRUNED:
        raise ModelError(f"{path} is a per-layer-width checkpoint of model_type {model_type!r}, which this version "
                         f"of diet does not define (it defines {', '.join(PRUNED)})",
                         "load it with the diet version that pruned it, or rewrite the pruned checkpoint with this "
                         "one", artifact="pruned_model")
    if model_type not in CONFIG_MAPPING:
        if model_type in PRUNED:
            raise ModelError(f"{path} has per-layer widths (model_type {model_type!r}) but the diet classes are not "
                             f"registered with transformers", LOAD_HINT)
        raise ModelError(f"{config_path}: model_type {model_type!r} is unknown to transformers "
                         f"{transformers.__version__}",
                         f"use a checkpoint of a supported family ({', '.join(SUPPORTED)}), or upgrade "
                         "transformers if the model is newer than it; then materialise the base model again",
                         artifact="base_model")
    family(model_type)  # a transformers model without a diet adapter: ModelError naming the supported ones
    if model_type in PRUNED:
        _check_layer_lists(raw, config_path)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - strict config validation raises several types
        raise ModelError(f"{config_path} does not validate: {_last_line(e)}",
                         **(PRUNED_FIX if model_type in PRUNED else MODEL_FIX)) from None


def _read_json(path: Path, fix: dict):
    """A checkpoint's JSON file, or a ModelError naming it and ``fix`` (MODEL_FIX or PRUNED_FIX)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON (truncated?): {e}", **fix) from None


def _check_layer_lists(raw: dict, config_path: Path) -> None:
    n = raw.get("num_hidden_layers")
    for field in PER_LAYER_FIELDS.values():
        values = raw.get(field)
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, int) and v > 0 for v in values):
            raise ModelError(f"{config_path}: {field} must be a list of positive integers, got {values!r}",
                             **PRUNED_FIX)
        if len(values) != n:
            raise ModelError(f"{config_path}: {field} lists {len(values)} widths for num_hidden_layers = {n}",
                             **PRUNED_FIX)


def config_widths(config) -> dict[str, list[int]]:
    """Per-layer widths a config describes, keyed like ``diet.keep.layer_widths``."""
    n = config.num_hidden_layers
    return {scalar: list(getattr(config, field, None) or [getattr(config, scalar)] * n)
            for scalar, field in PER_LAYER_FIELDS.items()}


def read_manifest(path: str | os.PathLike, config) -> dict:
    """``manifest.json`` of a pruned checkpoint, checked against its config (model_type, per-layer widths)."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"pruned checkpoint {path} has no manifest.json", **PRUNED_FIX)
    manifest = _read_json(manifest_path, PRUNED_FIX)
    checkpoint = manifest.get("checkpoint") if isinstance(manifest, dict) else None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in ("model_type", "widths", "parameters")):
        raise ModelError(f"{manifest_path} lacks its 'checkpoint' entry (model_type, widths, parameters)",
                         **PRUNED_FIX)
    if checkpoint["model_type"] != config.model_type:
        raise ModelError(f"{manifest_path} describes a {checkpoint['model_type']!r} checkpoint, config.json a "
                         f"{config.model_type!r} one", **PRUNED_FIX)
    widths = config_widths(config)
    stated = checkpoint["widths"] if isinstance(checkpoint["widths"], dict) else {}
    for name, values in widths.items():
        if stated.get(name) != values:
            raise ModelError(f"{manifest_path} gives {name} per layer {stated.get(name)}, config.json {values}",
                             **PRUNED_FIX)
    return manifest


def _check_parameters(path: Path, manifest: dict, model) -> None:
    stated = (manifest["checkpoint"].get("parameters") or {}).get("total")
    total = parameter_counts(model)["total"]
    if stated != total:
        raise ModelError(f"{path / 'manifest.json'} counts {stated} parameters, the loaded weights {total}",
                         **PRUNED_FIX)


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", *, pruned: bool | None = None,
               device: str | torch.device = "cpu"):
    """Load a stock or pruned checkpoint folder as a causal LM in eval mode, with the family's attention,
    where ``device`` (a ``model.device`` setting) puts it (``plan_placement``: the device is checked before
    anything is read, the model's size against the GPUs' memory from its config, before any weight is read).

    Every problem of the folder is a ModelError naming the artifact to rewrite. A pruned checkpoint
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
                         **(PRUNED_FIX if pruned else MODEL_FIX)) from None
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
                         **(PRUNED_FIX if (Path(path) / "manifest.json").exists() else MODEL_FIX)) from None
    return model, tokenizer
