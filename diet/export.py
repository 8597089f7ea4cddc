"""GGUF export: a pruned (or any supported) checkpoint as a file llama.cpp, Ollama and LM Studio run.

``write_gguf`` writes one file per tensor type with the ``gguf`` package: the weights under llama.cpp's tensor
names (``gguf.get_tensor_name_map``), the architecture's metadata and the tokenizer. ``read_gguf`` reads a file
back into a copy of the model it came from, so ``check_gguf`` can compare what the file computes with what the
checkpoint computes (logits on fixed prompts; the stage adds perplexity on the held-out passages).

What differs by family lives in the adapters (``diet.adapters``): the GGUF architecture (``gguf_arch``), the one
that carries per-layer widths (``gguf_arch_per_layer``: llama.cpp's ``deci`` architecture reads the feed-forward
length and both head counts as per-layer arrays, for Llama-layout models only; every other architecture takes one
width for all layers), whether llama.cpp rotates interleaved pairs so q/k rows are permuted
(``gguf_rope_interleaved``: Llama), the norm gain stored as ``norm_offset + weight`` (Gemma's ``1 + w``) and the
family's extra keys (``gguf_metadata``: Gemma's soft-capping, sliding window and its per-layer pattern).

Tensor types: F32, F16, BF16 and the block types the ``gguf`` package can write (Q8_0, Q5_0, Q5_1, Q4_0,
Q4_1). Two-dimensional weights get the type (the embedding and the output head stay Q8_0 in a 4- or 5-bit file,
as in llama.cpp's own recipes); norms and biases stay F32, as llama.cpp's own converter does. A block type needs
rows whose length is a multiple of its block (32): each layer's feed-forward width is padded to whole blocks with
zero channels (zero rows of gate and up, zero columns of down: they add exactly nothing), and a row that still
does not fit (a pruned hidden width that is not a multiple of 32) is written in F16 and listed in the result.

The tokenizer comes from the source GGUF when the base model came from one (every ``tokenizer.*`` key copied, so
llama.cpp pre-tokenizes as it did), otherwise from the tokenizer's own files: a byte-level BPE (Llama-3, Qwen2,
SmolLM) as llama.cpp's ``gpt2`` model with its default pre-tokenizer, a SentencePiece-style BPE (Gemma, Llama-2)
as its ``llama`` model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from diet.adapters import get_adapter
from diet.config import GGUF_TYPES
from diet.errors import ModelError
from diet.io import atomic_file
from diet.keep import layer_widths

log = logging.getLogger(__name__)

#: the largest logit difference, relative to the largest logit, that a float file may show against the model
#: it was written from (``check_float``): float16 and bfloat16 rounding, far below a quantised type's
FLOAT_TOLERANCE = {"F32": 1e-4, "F16": 1e-2, "BF16": 5e-2}
#: what llama.cpp reads of the tokenizer; copied whole from a source GGUF
TOKENIZER_PREFIX = "tokenizer."
#: fixed prompts for the logits check (tokenized with the model's own tokenizer)
PROMPTS = ("The capital of France is", "Water boils at a temperature of",
           "Question: Which is heavier, a kilogram of iron or a kilogram of feathers?\nAnswer:")

UNIFORM_FIX = ("prune with select.layout: uniform (one width for every layer), or export a Llama-family model, "
               "whose per-layer widths llama.cpp's deci architecture carries")


def check_type(name: str) -> str:
    """``name`` if it is a tensor type this module writes (``diet.config.GGUF_TYPES``), else a ModelError."""
    if name not in GGUF_TYPES:
        raise ModelError(f"unknown GGUF tensor type {name!r}", f"use one of: {', '.join(GGUF_TYPES)}")
    return name


def _file_type(name: str):
    import gguf

    return getattr(gguf.LlamaFileType, "ALL_F32" if name == "F32" else f"MOSTLY_{name}")


def check_float(qtype: str, gap: dict[str, float], path: Path) -> None:
    """A float file whose logits are further from the model's than its rounding explains is a broken export."""
    limit = FLOAT_TOLERANCE.get(qtype)
    if limit is not None and not gap["relative"] <= limit:
        raise ModelError(f"{path.name} computes logits {gap['relative']:.3g} (relative) away from the checkpoint's, "
                         f"beyond {qtype} rounding ({limit:g})", "report it: the export of this model is wrong")


def plan(model) -> tuple[str, bool]:
    """(GGUF architecture, per-layer arrays?) for ``model``; a ModelError naming the fix where GGUF cannot hold it."""
    from diet.modeling import OUTPUT_BIASES_FIELD

    adapter = get_adapter(model)
    widths = layer_widths(adapter)
    uneven = sorted(name for name, values in widths.items() if len(set(values)) > 1)
    biases = getattr(model.config, OUTPUT_BIASES_FIELD, None) or []
    if biases:  # only families without a stock bias flag carry them (Gemma MLP, Qwen2): no llama.cpp tensor
        raise ModelError(f"the {adapter.model_type} checkpoint has output biases on {', '.join(biases)} "
                         f"(prune.recover: bias) that llama.cpp's {adapter.gguf_arch} architecture has no tensor for",
                         "export a checkpoint pruned with prune.recover: none")
    if not uneven:
        return adapter.gguf_arch, False
    if adapter.gguf_arch_per_layer is None:
        raise ModelError(f"the checkpoint's widths differ per layer ({', '.join(uneven)}; layout global), and "
                         f"llama.cpp's {adapter.gguf_arch} architecture takes one width for every layer", UNIFORM_FIX)
    return adapter.gguf_arch_per_layer, True


def _arch_enum(arch: str):
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise ModelError(f"the gguf package knows no architecture {arch!r}", "upgrade the gguf package")


def _permute(w: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """Rows of q/k (weight or bias) between transformers' half-split rotary layout and llama.cpp's pairs."""
    half = w.shape[0] // heads // 2
    split = (heads, half, 2) if inverse else (heads, 2, half)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_map(model, arch: str) -> dict[str, tuple[str, int | None, str | None]]:
    """state-dict key -> (GGUF name, layer, 'q' | 'k' | None) for every tensor the file holds."""
    import gguf

    adapter = get_adapter(model)
    names = gguf.get_tensor_name_map(_arch_enum(arch), adapter.num_layers)
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    out = {}
    for key in model.state_dict():
        if tied and key == "lm_head.weight":
            continue
        base, _, suffix = key.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ModelError(f"no GGUF name for tensor {key!r} in llama.cpp's {arch} architecture",
                             "export a checkpoint of a supported family (diet.adapters)")
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        rope = "q" if base.endswith("q_proj") else "k" if base.endswith("k_proj") else None
        out[key] = (f"{name}.{suffix}", layer, rope)
    return out


def _heads(adapter, layer: int, which: str) -> int:
    return adapter.num_heads(layer) if which == "q" else adapter.num_kv_heads(layer)


def _to_file(adapter, key: str, value: torch.Tensor, layer: int | None, rope: str | None) -> np.ndarray:
    """One tensor as the file stores it (float32): norm gains with their offset, q/k rows in llama.cpp's order."""
    w = value.detach().to("cpu", torch.float32).numpy()
    if key.endswith("norm.weight"):
        w = w + np.float32(adapter.norm_offset)
    if rope and adapter.gguf_rope_interleaved:
        w = _permute(w, _heads(adapter, layer, rope))
    return np.ascontiguousarray(w)


def _from_file(adapter, key: str, w: np.ndarray, layer: int | None, rope: str | None) -> np.ndarray:
    if rope and adapter.gguf_rope_interleaved:
        w = _permute(w, _heads(adapter, layer, rope), inverse=True)
    if key.endswith("norm.weight"):
        w = w - np.float32(adapter.norm_offset)
    return w


#: GGUF tensors that stay in Q8_0 when the file's type has fewer bits (llama.cpp's own 4- and 5-bit files keep
#: the embedding and the output head at 6-8 bits: they are a large share of a small model's error)
KEEP_8_BIT = ("token_embd.weight", "output.weight")


#: the block length of every block type written here (Q8_0, Q5_x, Q4_x)
BLOCK = 32


def padded_width(width: int, qtype: str) -> int:
    """The feed-forward width a file of ``qtype`` stores: a block type's rounded up to whole blocks (the extra
    channels are zero in gate, up and down, so they add exactly nothing), a float type's as it is."""
    if qtype in FLOAT_TOLERANCE:
        return width
    return -(-width // BLOCK) * BLOCK


def _mlp_roles(model) -> dict[str, tuple[str, int]]:
    """Module name -> ('rows' | 'cols', layer) for the MLP projections: the ones whose channels are padded."""
    adapter = get_adapter(model)
    role = {}
    for layer in range(adapter.num_layers):
        inputs, output = adapter.mlp_projections(layer)
        role.update({id(m): ("rows", layer) for m in inputs})
        role[id(output)] = ("cols", layer)
    return {name: role[id(m)] for name, m in model.named_modules() if id(m) in role}


def _pad(w: np.ndarray, role: str, to: int) -> np.ndarray:
    if role == "rows":  # gate / up: weight rows or bias entries are channels
        return np.pad(w, [(0, to - w.shape[0])] + [(0, 0)] * (w.ndim - 1))
    if w.ndim == 2:     # down: weight columns are channels (its bias is hidden-wide)
        return np.pad(w, [(0, 0), (0, to - w.shape[1])])
    return w


def _unpad(w: np.ndarray, role: str, width: int) -> np.ndarray:
    if role == "rows":
        return w[:width]
    return w[:, :width] if w.ndim == 2 else w


def _encode(w: np.ndarray, qtype: str, name: str = "") -> tuple[np.ndarray, Any, bool]:
    """(data, raw dtype for the writer, fell back to F16?) of one float32 tensor in type ``qtype``."""
    import gguf

    if qtype.startswith(("Q4", "Q5")) and name in KEEP_8_BIT:
        qtype = "Q8_0"
    if w.ndim < 2 or qtype == "F32":
        return w, None, False
    if qtype == "F16":
        return w.astype(np.float16), None, False
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if w.shape[-1] % block:
        return w.astype(np.float16), None, True
    return gguf.quants.quantize(w, kind), kind, False


def _metadata(writer, model, arch: str, per_layer: bool, name: str, qtype: str) -> None:
    import gguf

    adapter = get_adapter(model)
    config = model.config
    n = adapter.num_layers
    ff = [padded_width(adapter.mlp_projections(i)[1].in_features, qtype) for i in range(n)]
    heads = [adapter.num_heads(i) for i in range(n)]
    kv = [adapter.num_kv_heads(i) for i in range(n)]
    one = (lambda v: v) if per_layer else (lambda v: v[0])
    writer.add_name(name)
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(adapter.hidden_size())
    writer.add_block_count(n)
    writer.add_feed_forward_length(one(ff))
    writer.add_head_count(one(heads))
    writer.add_head_count_kv(one(kv))
    writer.add_key_length(adapter.head_dim())
    writer.add_value_length(adapter.head_dim())
    writer.add_rope_dimension_count(adapter.head_dim())
    writer.add_rope_freq_base(float(adapter.rope_theta()))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    for key, value in adapter.gguf_metadata().items():
        getattr(writer, f"add_{key}")(value)


def write_gguf(model, path: str | Path, qtype: str, tokenizer_fields: list[tuple[str, Any, Any, Any]],
               name: str) -> dict:
    """Write ``model`` to ``path`` as GGUF in tensor type ``qtype`` (atomically); returns what was written.

    ``tokenizer_fields`` comes from ``tokenizer_fields`` (below). In a block type, each layer's feed-forward
    width is padded to whole blocks with zero channels (``padded_width``): the file computes the same, and
    down_proj's rows fit the blocks. The result lists the file's architecture, its bytes, the layers padded and
    the tensors written in F16 because their rows still do not fit the type's blocks (a hidden width that is
    not a multiple of 32).
    """
    import gguf

    check_type(qtype)
    arch, per_layer = plan(model)
    adapter = get_adapter(model)
    tensors = _tensor_map(model, arch)
    state = model.state_dict()
    fallback, padded = [], set()
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, model, arch, per_layer, name, qtype)
        for key, value, vtype, sub in tokenizer_fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        roles = _mlp_roles(model)
        for key, (gname, layer, rope) in tensors.items():
            w = _to_file(adapter, key, state[key], layer, rope)
            role = roles.get(key.rpartition(".")[0])
            if role:
                width = adapter.mlp_projections(role[1])[1].in_features
                if padded_width(width, qtype) != width:
                    w = _pad(w, role[0], padded_width(width, qtype))
                    padded.add(role[1])
            data, raw, fell_back = _encode(w, qtype, gname)
            if fell_back:
                fallback.append(gname)
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if fallback:
        log.warning("%s: %d tensors written in F16, their rows do not fit %s blocks of 32 (a hidden width that "
                    "is a multiple of 32 avoids it)", path.name, len(fallback), qtype)
    return {"type": qtype, "architecture": arch, "per_layer_widths": per_layer, "bytes": path.stat().st_size,
            "tensors": len(tensors), "f16_fallback": fallback, "padded_layers": sorted(padded)}


def read_gguf(path: str | Path, like) -> torch.nn.Module:
    """A copy of ``like`` (the model the file was written from) holding the file's dequantised weights.

    The file's widths must be ``like``'s, and it must hold exactly the tensors ``like`` has (a ModelError
    otherwise): this reads what ``write_gguf`` wrote, to check it, not arbitrary GGUF files.
    """
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}", "export the pruned checkpoint again",
                         artifact="gguf") from None
    arch = str(reader.fields["general.architecture"].contents())
    _check_widths(reader, arch, like, path)
    model = copy.deepcopy(like)
    adapter = get_adapter(model)
    wanted = {gname: (key, layer, rope) for key, (gname, layer, rope) in _tensor_map(model, arch).items()}
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(wanted):
        raise ModelError(f"{path} holds tensors {sorted(set(found) ^ set(wanted))[:4]} that the model does not "
                         "(or lacks them)", "export the pruned checkpoint again", artifact="gguf")
    state, roles = {}, _mlp_roles(model)
    for gname, (key, layer, rope) in wanted.items():
        t = found[gname]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape)))
        role = roles.get(key.rpartition(".")[0])
        if role:
            w = _unpad(w, role[0], adapter.mlp_projections(role[1])[1].in_features)
        state[key] = torch.from_numpy(_from_file(adapter, key, w, layer, rope).copy())
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)
    return model.eval()


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def _check_widths(reader, arch: str, like, path: Path) -> None:
    adapter = get_adapter(like)
    n = adapter.num_layers
    expect = {
        "block_count": n, "embedding_length": adapter.hidden_size(),
        "feed_forward_length": [adapter.mlp_projections(i)[1].in_features for i in range(n)],
        "attention.head_count": [adapter.num_heads(i) for i in range(n)],
        "attention.head_count_kv": [adapter.num_kv_heads(i) for i in range(n)],
    }
    for key, want in expect.items():
        got = _field(reader, f"{arch}.{key}")
        if isinstance(want, list) and not isinstance(got, list):
            got = [got] * n
        if key == "feed_forward_length" and isinstance(got, list) and len(got) == n:  # padded to whole blocks
            got = [w if g == padded_width(w, "Q8_0") else g for g, w in zip(got, want)]
        if got != want:
            raise ModelError(f"{path}: {arch}.{key} is {got}, the model has {want}",
                             "export the pruned checkpoint again (the file is not from this checkpoint)",
                             artifact="gguf")


def gguf_widths(path: str | Path) -> dict[str, Any]:
    """The architecture and widths a GGUF file declares (its metadata, as llama.cpp reads it)."""
    import gguf

    reader = gguf.GGUFReader(Path(path))
    arch = str(reader.fields["general.architecture"].contents())
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length")
    return {"architecture": arch, **{k: _field(reader, f"{arch}.{k}") for k in keys}}


# -- tokenizer -------------------------------------------------------------------------------------------------

def tokenizer_fields(tokenizer, vocab_size: int, source_gguf: str | Path | None = None) -> list[tuple]:
    """The ``tokenizer.*`` metadata as (key, value, GGUFValueType, sub type) rows for ``write_gguf``."""
    if source_gguf is not None:
        return _copied_fields(Path(source_gguf))
    return _converted_fields(tokenizer, vocab_size)


def _copied_fields(source: Path) -> list[tuple]:
    import gguf

    reader = gguf.GGUFReader(source)
    rows = []
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        rows.append((key, field.contents(), vtype, sub))
    if not rows:
        raise ModelError(f"the source GGUF {source} holds no tokenizer", "export from a model with a tokenizer")
    return rows


def _components(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [c for n in inner for c in _components(n)]
    return [node]


def _converted_fields(tokenizer, vocab_size: int) -> list[tuple]:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = [c.get("type") for c in _components(spec.get("pre_tokenizer"))]
    norm = _components(spec.get("normalizer"))
    if model.get("type") != "BPE":
        raise ModelError(f"the tokenizer is a {model.get('type')} model; GGUF export converts BPE tokenizers only",
                         "export from a GGUF source (its tokenizer is copied), or a model with a BPE tokenizer")
    if "ByteLevel" in pre:
        kind = "gpt2"
    elif "Metaspace" in pre or any(n.get("type") == "Replace" and "\u2581" in json.dumps(n) for n in norm):
        kind = "llama"
    else:
        raise ModelError(f"the BPE tokenizer's pre-tokenizer ({pre or 'none'}) is neither byte-level nor "
                         "SentencePiece-style", "export from a GGUF source (its tokenizer is copied)")
    n = len(tokenizer)
    if n > vocab_size:
        raise ModelError(f"the tokenizer has {n} tokens, the model's embedding {vocab_size} rows",
                         "export the tokenizer the model was trained with")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in tokenizer.added_tokens_decoder.items()}
    types = []
    for i, tok in enumerate(tokens):
        if i in special:
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    A, S, U, B, F = (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32,
                     gguf.GGUFValueType.BOOL, gguf.GGUFValueType.FLOAT32)
    rows = [("tokenizer.ggml.model", kind, S, None), ("tokenizer.ggml.pre", "default", S, None),
            ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", [int(t) for t in types], A,
                                                      gguf.GGUFValueType.INT32),
            ("tokenizer.ggml.merges", merges, A, S)]
    if kind == "llama":
        rows.append(("tokenizer.ggml.scores", [float(-i) for i in range(vocab_size)], A, F))
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if tid is not None:
            rows.append((f"tokenizer.ggml.{key}_token_id", int(tid), U, None))
    ids = tokenizer("a")["input_ids"]
    rows.append(("tokenizer.ggml.add_bos_token", bool(ids) and ids[0] == tokenizer.bos_token_id, B, None))
    rows.append(("tokenizer.ggml.add_eos_token", bool(ids) and ids[-1] == tokenizer.eos_token_id
                 and tokenizer.eos_token_id != tokenizer.bos_token_id, B, None))
    if kind == "llama":
        rows.append(("tokenizer.ggml.add_space_prefix", True, B, None))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        rows.append(("tokenizer.chat_template", tokenizer.chat_template, S, None))
    return rows


# -- checks ----------------------------------------------------------------------------------------------------

def prompt_batches(tokenizer, prompts=PROMPTS) -> Iterator[torch.Tensor]:
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        yield ids


@torch.no_grad()
def logits_gap(model, other, tokenizer, prompts=PROMPTS) -> dict[str, float]:
    """How far ``other``'s logits are from ``model``'s on fixed prompts: the largest absolute difference, that
    difference relative to the largest logit, and the share of positions whose top token agrees."""
    worst, scale, agree, total = 0.0, 0.0, 0, 0
    for ids in prompt_batches(tokenizer, prompts):
        a = model(input_ids=ids).logits.float()
        b = other(input_ids=ids).logits.float()
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0] * a.shape[1]
    return {"max_abs_logit_diff": worst, "relative": worst / max(scale, 1e-12), "top1_agreement": agree / total}
