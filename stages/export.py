"""DVC stage `export`: the pruned checkpoint as GGUF files for llama.cpp, Ollama and LM Studio (diet.export).

Writes ``--out`` (a folder): ``model-<TYPE>.gguf`` for each of ``export.types``, ``export.json`` (per file: its
bytes and sha256, the architecture, the tensors written in F16 for want of whole blocks, how far its logits are
from the checkpoint's on fixed prompts, and its perplexity on the held-out passages against the checkpoint's)
and ``README.md`` (how to run each file). ``--metrics`` gets the per-file numbers for ``dvc metrics show``.

Each file is read back and compared before anything is written: a float file (F32, F16, BF16) whose logits are
further from the checkpoint's than its rounding explains fails the stage. With ``export.types: []`` the stage
writes an empty summary without loading the model.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.export")


def other_outputs(dvc_yaml: Path, stage: str = "export") -> list[Path]:
    """The outputs dvc.yaml gives every stage but ``stage`` (a templated path stands for its folder)."""
    if not dvc_yaml.is_file():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    found = []
    for name, spec in stages.items():
        if name == stage or not isinstance(spec, dict):
            continue
        spec = spec.get("do", spec)
        for section in ("outs", "metrics", "plots"):
            for out in spec.get(section) or []:
                path = next(iter(out)) if isinstance(out, dict) else out
                if isinstance(path, str):
                    found.append(Path(path.split("${")[0] or ".").parent if "${" in path else Path(path))
    return found


def check_out(out: Path, inputs: list[Path], dvc_yaml: Path) -> None:
    """Refuse an output folder inside (or holding) an input or another stage's output: DVC would delete it."""
    from diet.errors import ConfigError

    target = out.resolve()
    for other in [*inputs, *other_outputs(dvc_yaml)]:
        o = other.resolve()
        if o == Path.cwd().resolve():
            continue
        if target == o or o in target.parents or target in o.parents:
            raise ConfigError(f"--out {out} lies inside (or holds) {other}, another stage's output or an input: "
                              "DVC would delete one with the other",
                              "write the GGUF files to a folder of their own, e.g. --out models/gguf")


def main(args, params) -> None:
    set_threads()
    from diet.io import atomic_dir, check_writable, write_json, write_text

    check_out(args.out, [args.model, args.base], Path("dvc.yaml"))
    check_writable(args.out, args.metrics)
    cfg = params.export
    if not cfg.types:
        with atomic_dir(args.out) as tmp:
            write_json(tmp / "export.json", {"types": [], "files": {}})
        write_json(args.metrics, {})
        log.info("export.types is empty: no GGUF file written (set e.g. export.types: [F16, Q8_0, Q4_0])")
        return

    from diet import export
    from diet.cards import gguf_card
    from diet.errors import ModelError
    from diet.evaluation.perplexity import heldout_perplexity
    from diet.io import read_json, sha256_file
    from diet.checkpoint import load_model, read_manifest, read_config
    from diet.model_sources import source_gguf
    from diet.scorefile import model_fingerprint
    from transformers import AutoTokenizer

    manifest = read_manifest(args.model, read_config(args.model))  # missing or foreign: refused here
    base_fp = model_fingerprint(args.base)
    if manifest.get("base_model_fingerprint") != base_fp:
        raise ModelError(f"{args.model}/manifest.json names base model {manifest.get('base_model_fingerprint')!r}, "
                         f"but {args.base} is {base_fp!r}: the checkpoint was not pruned from this base model",
                         "rerun `dvc repro prune` (or pass the --base the checkpoint was pruned from)")
    model = load_model(args.model, params.model.dtype, pruned=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    arch, per_layer = export.plan(model)  # refused before anything is written
    provenance = read_json(args.base / "diet_source.json") if (args.base / "diet_source.json").is_file() else {}
    base_name = provenance.get("description", provenance.get("source", str(args.base)))
    name = f"{base_name.split(' (')[0]} pruned {manifest['mask'].get('achieved_sparsity', '?')} (DIET)"
    ppl_ref = None
    if cfg.perplexity_docs:
        ppl_ref = heldout_perplexity(model, tokenizer, n_docs=cfg.perplexity_docs,
                                     max_length=params.evaluate.perplexity_max_length,
                                     batch_size=params.evaluate.batch_size)
    files = {}
    with atomic_dir(args.out) as tmp, source_gguf(provenance, args.out.parent / ".export-source") as src:
        fields = export.tokenizer_fields(tokenizer, model.get_input_embeddings().weight.shape[0], src)
        for qtype in cfg.types:
            path = tmp / f"model-{qtype}.gguf"
            log.info("writing %s (%s%s)", path.name, arch, ", per-layer widths" if per_layer else "")
            info = export.write_gguf(model, path, qtype, fields, name=name)
            back = export.read_gguf(path, model)
            gap = export.logits_gap(model, back, tokenizer)
            export.check_float(qtype, gap, path)
            ppl = None
            if cfg.perplexity_docs:
                ppl = heldout_perplexity(back, tokenizer, n_docs=cfg.perplexity_docs,
                                         max_length=params.evaluate.perplexity_max_length,
                                         batch_size=params.evaluate.batch_size)["ppl"]
            del back
            files[qtype] = {**info, "file": path.name, "sha256": sha256_file(path), "logits": gap,
                            "perplexity": ppl, "f16_fallback": len(info["f16_fallback"])}
            log.info("%s: %.1f MB, top-1 agreement %.3f, max |logit diff| %.4f%s", path.name, info["bytes"] / 2**20,
                     gap["top1_agreement"], gap["max_abs_logit_diff"], f", perplexity {ppl:.3f}" if ppl else "")
        summary = {"types": list(cfg.types), "architecture": arch, "per_layer_widths": per_layer,
                   "tokenizer": "copied from the source GGUF" if src else "converted from the tokenizer files",
                   "checkpoint_perplexity": ppl_ref and ppl_ref["ppl"], "perplexity_docs": cfg.perplexity_docs,
                   "files": files}
        write_json(tmp / "export.json", summary)
        write_text(tmp / "README.md", gguf_card(summary, manifest, provenance))
    write_json(args.metrics, {t: {"mb": round(f["bytes"] / 2**20, 2), "top1": round(f["logits"]["top1_agreement"], 4),
                                  **({"ppl": round(f["perplexity"], 4)} if f["perplexity"] else {})}
                              for t, f in files.items()})


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/pruned", type=Path, help="the pruned checkpoint")
    p.add_argument("--base", default="models/base", type=Path, help="the base model it was pruned from")
    p.add_argument("--out", default="models/gguf", type=Path)
    p.add_argument("--metrics", default="metrics/export.json", type=Path)
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
