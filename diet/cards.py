"""Model cards: the README.md of a pruned checkpoint folder and of its GGUF files.

Each card opens with the Hugging Face Hub's YAML front matter (``base_model`` by the release's real name,
``license`` from that release, ``library_name``, ``pipeline_tag``, ``tags`` with the merge method, the tasks the
mask was profiled on and the metrics the pipeline reports), then says how to load and run the model.
"""

from __future__ import annotations

from typing import Any

import yaml

#: what the pipeline reports on every pruned model (results/, dvc metrics show)
METRICS = ("accuracy", "perplexity")


def source_facts(provenance: dict | None) -> dict[str, str]:
    """The base model's Hub name, licence and readable name, as far as its provenance tells them."""
    from diet.model_sources import BUILTINS

    provenance = provenance or {}
    kind, source = provenance.get("kind"), provenance.get("source", "")
    if kind == "builtin" and source in BUILTINS:
        b = BUILTINS[source]
        note = f"{b.hub_id}, as the 4-bit GGUF `{provenance.get('file', '?')}` expanded to {provenance.get('dtype', 'float32')}"
        return {"base_model": b.hub_id, "license": b.license, "name": b.hub_id.split("/")[-1], "note": note}
    if kind == "hub":
        return {"base_model": source, "name": source.split("/")[-1], "note": source}
    return {"name": source or "the base model", "note": source or "a local checkpoint"}


def front_matter(manifest: dict, provenance: dict | None, library: str, extra_tags: tuple[str, ...] = ()) -> str:
    facts = source_facts(provenance)
    meta: dict[str, Any] = {}
    for key in ("base_model", "license"):
        if facts.get(key):
            meta[key] = facts[key]
    meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    method = manifest.get("method")
    meta["tags"] = ["pruned", "structured-pruning", "diet", *([f"diet-{method}"] if method else []), *extra_tags]
    meta["metrics"] = list(METRICS)
    mask = manifest.get("mask") or {}
    diet = {"method": method, "tasks": list(manifest.get("tasks") or []) or None,
            "sparsity": mask.get("achieved_sparsity"), "layout": mask.get("layout")}
    meta["diet"] = {k: v for k, v in diet.items() if v is not None}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def _summary_line(manifest: dict, provenance: dict | None, widths: str) -> str:
    mask = manifest.get("mask") or {}
    facts = source_facts(provenance)
    method = f" with merge method `{manifest['method']}`" if manifest.get("method") else ""
    tasks = f", profiled on {', '.join(manifest['tasks'])}" if manifest.get("tasks") else ""
    return (f"{facts['name']} ({facts['note']}) pruned by DIET{method}{tasks}: {mask.get('achieved_sparsity', '?')} "
            f"of the decoder-layer parameters removed (target {mask.get('target_sparsity', '?')}, layout "
            f"{mask.get('layout', '?')}). {widths}")


#: the transformers release on which ``stock_on_layer_config`` was measured (tests/test_layer_schema.py)
STOCK_MEASURED_ON = "5.24.0"


def stock_on_layer_config(family: str) -> str:
    """What stock transformers (``STOCK_MEASURED_ON``) does with per-layer widths as ``per_layer_config`` under
    the stock model_type ``family``."""
    from diet.adapters import adapter_class

    config_check = ("" if not adapter_class(family).stock_config_checks_heads else "; where the head counts "
                    "differ, its config validation (`hidden_size % num_attention_heads`) raises it already")
    return (f"with `model_type` set to `{family}`, it reads `per_layer_config` into a heterogeneous config, but its "
            f"{family} modeling still builds every layer from the global `intermediate_size` and head counts, and "
            f"reading a width that differs per layer from the global config raises "
            f"`AmbiguousGlobalPerLayerAttributeError`{config_check}. It refuses the checkpoint rather than build it "
            "at the wrong widths")


def pruned_card(model_type: str, family: str, stock_loadable: bool, manifest: dict,
                provenance: dict | None = None, *, layer_schema: bool = False, output_biases: bool = False) -> str:
    """README.md of a pruned checkpoint: what it is, how to load it, how to run it in llama.cpp.

    ``layer_schema``: config.json gives the per-layer widths as transformers' ``per_layer_config``;
    ``output_biases``: it also lists output biases that no stock config expresses.
    """
    lines = [front_matter(manifest, provenance, "transformers", (family,)) + f"# Pruned {family} checkpoint (DIET)",
             "", _summary_line(manifest, provenance, "`manifest.json` lists the per-layer widths and the parameter "
                               "counts."), "", "## Load it", ""]
    if stock_loadable:
        lines += ["Every layer has the same widths: the config is a stock one, so plain transformers loads it:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```"]
    else:
        lines += [f"The layers have different widths (model_type `{model_type}`). Its classes are registered with "
                  "transformers by `diet.modeling`, so import it first:", "",
                  "```python", "import diet.modeling  # registers the per-layer-width classes",
                  "from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  "# or: model = diet.modeling.load_model(\"path/to/this/folder\")", "```", "",
                  "Without that import transformers does not recognise the model type and asks to upgrade it; "
                  "upgrading does not help."]
        if layer_schema:
            lines += ["", "`config.json` gives the widths of each layer as `per_layer_config`, transformers' own schema "
                      "for layers that differ (layer index -> `intermediate_size`, `num_attention_heads`, "
                      "`num_key_value_heads`); the global fields hold the widest layer. What stock transformers "
                      f"{STOCK_MEASURED_ON} does with it, measured: {stock_on_layer_config(family)}. "
                      + ("Once stock modeling builds each layer from `per_layer_config`, that `model_type` is the "
                         "one change this folder needs to load without `diet`." if not output_biases else
                         "This checkpoint also lists `output_biases` (bias terms no stock config of this family "
                         "expresses), so it keeps needing `diet` even then.")]
    lines += ["", "## Run it in llama.cpp, Ollama or LM Studio", "",
              "The pipeline's `export` stage writes this checkpoint as GGUF files (set `export.types` in params.yaml, "
              "e.g. `[F16, Q8_0, Q4_0]`, then `dvc repro export`). `models/gguf/README.md` lists each file with its "
              "size and the perplexity its quantisation costs; run one with", "",
              "```sh", 'llama-cli -m models/gguf/model-Q8_0.gguf -p "The capital of France is" -n 32', "```"]
    return "\n".join(lines) + "\n"


def gguf_card(summary: dict, manifest: dict, provenance: dict | None) -> str:
    """README.md of the GGUF folder: what each file is, what its type cost, and the command lines that run it."""
    arch = summary["architecture"]
    lines = [front_matter(manifest, provenance, "gguf", ("gguf", arch)) + "# GGUF files of a DIET-pruned model", "",
             _summary_line(manifest, provenance, "The checkpoint's folder (models/pruned) holds its manifest."), "",
             f"llama.cpp architecture `{arch}`"
             + (" (per-layer feed-forward and head counts)" if summary["per_layer_widths"] else "")
             + f"; tokenizer {summary['tokenizer']}.", ""]
    ref = summary.get("checkpoint_perplexity")
    docs = summary.get("perplexity_docs")
    lines += ["| file | type | MB | top-1 agreement | max abs logit diff |"
              + (f" perplexity ({docs} passages) | vs checkpoint |" if ref else ""),
              "|---|---|---:|---:|---:|" + ("---:|---:|" if ref else "")]
    for qtype, f in summary["files"].items():
        row = (f"| `{f['file']}` | {qtype} | {f['bytes'] / 2**20:.1f} | {f['logits']['top1_agreement']:.3f} | "
               f"{f['logits']['max_abs_logit_diff']:.4f} |")
        if ref:
            row += f" {f['perplexity']:.3f} | {f['perplexity'] - ref:+.3f} |"
        lines.append(row)
    if ref:
        lines += ["", f"The float32 checkpoint's perplexity on the same passages: {ref:.3f}."]
    lines += ["", "Top-1 agreement and the logit difference compare the file, read back and dequantised, with the "
              "checkpoint on fixed prompts.", "", "## Run it", "", "```sh",
              f'llama-cli -m {next(iter(summary["files"].values()))["file"]} -p "The capital of France is" -n 32',
              "```", "", "With Ollama: a `Modelfile` holding `FROM ./" + next(iter(summary["files"].values()))["file"]
              + "`, then `ollama create pruned -f Modelfile` and `ollama run pruned`."]
    return "\n".join(lines) + "\n"
