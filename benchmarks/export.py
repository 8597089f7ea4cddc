"""GGUF export of the dense and the pruned model: file size, perplexity, and what llama.cpp makes of the files.

    python benchmarks/export.py                       # models/base and models/pruned, F16 Q8_0 Q4_0
    python benchmarks/export.py --llama-cpp --docs 20 # also run every file in llama.cpp (llama-cpp-python)

For each model (``--base``, ``--pruned``) and each ``--types`` entry the file is written with ``diet.export``
(tokenizer copied from the source GGUF when the base model came from one) into a temporary folder, then:

1. **Perplexity, read back in torch**: the file dequantised into the model (``diet.export.read_gguf``), on the
   first ``--docs`` held-out passages (``diet.evaluation.perplexity.heldout_passages``), each cut to
   ``--max-length`` tokens of the model's own tokenizer; beside it the float32 checkpoint's on the same tokens.
2. **llama.cpp** (``--llama-cpp``; needs ``pip install llama-cpp-python``, a few minutes' build): the same token
   ids through llama.cpp's own forward (``Llama.eval``, all logits kept), giving its perplexity; its logits on the
   first passage against the float32 checkpoint's (largest absolute difference, top-1 agreement); and decoding
   speed, tokens per second of ``--new-tokens`` greedy tokens after a fixed prompt (median of ``--repeats``,
   ``--threads`` threads), for the pruned file against the dense file of the same type. llama.cpp's weight
   repacking is off unless ``--repack`` (see its help).

Writes ``benchmarks/results/export.json`` and prints a markdown table (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins"


def token_lists(tokenizer, n_docs: int, max_length: int) -> list[list[int]]:
    from diet.evaluation.perplexity import heldout_passages

    out = []
    for text in heldout_passages(n_docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) > 1:
            out.append(ids)
    return out


def nll_sum(logits, ids) -> float:
    """Summed negative log-likelihood of ids[1:] under next-token logits (T, V) of ids[:-1]."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)[: len(ids) - 1]
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def torch_ppl(model, docs) -> float:
    import math

    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            total += nll_sum(logits, ids)
            n += len(ids) - 1
    return math.exp(total / n)


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_run(path: Path, docs, reference, args) -> dict:
    """llama.cpp's perplexity on ``docs``, its logits on docs[0] against ``reference``, and decode speed."""
    import math

    import numpy as np
    import llama_cpp.llama as high_level
    from llama_cpp import Llama

    low = high_level.llama_cpp  # the C API module the constructor reads its default params from
    if not args.repack and not getattr(low.llama_model_default_params, "no_repack", False):
        default = low.llama_model_default_params

        def no_repack():  # llama-cpp-python's constructor has no switch for it
            params = default()
            params.use_extra_bufts = False
            return params

        no_repack.no_repack = True
        low.llama_model_default_params = no_repack
    llm = Llama(model_path=str(path), n_ctx=args.max_length + 8, logits_all=True, n_threads=args.threads,
                verbose=False, seed=0)
    total, n, first = 0.0, 0, None
    for ids in docs:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        if first is None:
            first = logits
        total += nll_sum(logits, ids)
        n += len(ids) - 1
    diff = np.abs(first - reference)
    agree = float((first.argmax(-1) == reference.argmax(-1)).mean())
    speeds = []
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
    for _ in range(args.repeats):
        llm.reset()
        start = time.perf_counter()
        made = 0
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            made += 1
            if made == 1:
                start = time.perf_counter()  # decode speed: after the prompt's forward and the first token
            if made > args.new_tokens:
                break
        speeds.append(args.new_tokens / (time.perf_counter() - start))
    del llm
    return {"ppl": math.exp(total / n), "max_abs_logit_diff": float(diff.max()),
            "top1_agreement": agree, "tokens_per_s": statistics.median(speeds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="models/base", type=Path)
    p.add_argument("--pruned", default="models/pruned", type=Path)
    p.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0"])
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--llama-cpp", action="store_true", help="also run the files in llama.cpp (llama-cpp-python)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repack", action="store_true",
                   help="let llama.cpp repack quantised weights for its CPU kernels (off by default: on an AVX-512/AMX "
                        "machine here the repacked kernels crashed on every quantised file, the source release's too)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/export.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from diet import export
    from diet.io import read_json, write_json
    from diet.checkpoint import load_model
    from diet.model_sources import source_gguf

    provenance = read_json(args.base / "diet_source.json") if (args.base / "diet_source.json").is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(args.base))
    docs = token_lists(tokenizer, args.docs, args.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_gguf(provenance, Path(tmp) / "src") as src:
        for label, folder in (("dense", args.base), ("pruned", args.pruned)):
            model = load_model(folder, "float32")
            fields = export.tokenizer_fields(tokenizer, model.get_input_embeddings().weight.shape[0], src)
            ref_ppl = torch_ppl(model, docs)
            ref_logits = torch_logits(model, docs[0])
            params = sum(t.numel() for t in model.parameters())
            for qtype in args.types:
                path = Path(tmp) / f"{label}-{qtype}.gguf"
                info = export.write_gguf(model, path, qtype, fields, name=f"{label} {qtype}")
                back = export.read_gguf(path, model)
                row = {"model": label, "type": qtype, "architecture": info["architecture"],
                       "mb": info["bytes"] / 2**20, "f16_fallback": len(info["f16_fallback"]),
                       "parameters": params, "ppl_float32": ref_ppl, "ppl_torch": torch_ppl(back, docs)}
                del back
                if args.llama_cpp:
                    row["llama_cpp"] = llama_cpp_run(path, docs, ref_logits, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
                path.unlink()
            del model
    tokens = sum(len(d) - 1 for d in docs)
    result = {"docs": len(docs), "tokens": tokens, "max_length": args.max_length, "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    write_json(args.out, result)
    print(table(result))
    return 0


def table(result: dict) -> str:
    rows = result["rows"]
    cpp = any("llama_cpp" in r for r in rows)
    dense = {r["type"]: r for r in rows if r["model"] == "dense"}
    head = "| model | type | arch | MB | ppl (float32 checkpoint) | ppl (file, torch) |"
    sep = "|---|---|---|---:|---:|---:|"
    if cpp:
        head += " ppl (llama.cpp) | max abs logit diff (llama.cpp vs checkpoint) | top-1 agreement | tokens/s | speed-up vs dense |"
        sep += "---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['type']} | {r['architecture']} | {r['mb']:.1f} | {r['ppl_float32']:.2f} | "
                f"{r['ppl_torch']:.2f} |")
        if cpp:
            c = r["llama_cpp"]
            base = dense.get(r["type"], {}).get("llama_cpp", {}).get("tokens_per_s")
            speedup = f"{c['tokens_per_s'] / base:.2f}x" if base else ""
            line += (f" {c['ppl']:.2f} | {c['max_abs_logit_diff']:.3f} | {c['top1_agreement']:.3f} | "
                     f"{c['tokens_per_s']:.1f} | {speedup} |")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
