"""GGUF export (diet.export, stages.export): what a file computes is what the checkpoint computes."""

from __future__ import annotations

import json

import pytest
import torch

from diet import export
from diet.errors import ConfigError, ModelError
from diet.pruning import apply_mask
from tests.test_pruning import random_keep, random_means
from tests.tiny import FAMILIES, VOCAB, tiny_model, tiny_tokenizer

# texts whose characters the tiny tokenizer knows (an unknown one is <unk> there and a byte fallback in GGUF)
TEXTS = ["the cat sat on the mat", "question: which gas do plants take in? answer: carbon"]


def uniform(family: str, groups=("mlp", "attention"), seed: int = 0):
    model = tiny_model(family, seed=seed)
    apply_mask(model, random_keep(model, groups, "uniform", seed=seed), "uniform")
    return model


def written(model, path, qtype, tokenizer=None):
    tokenizer = tokenizer or tiny_tokenizer()
    fields = export.tokenizer_fields(tokenizer, model.get_input_embeddings().weight.shape[0])
    return export.write_gguf(model, path, qtype, fields, name="tiny")


@torch.no_grad()
def gap(a, b, tokenizer=None):
    return export.logits_gap(a, b, tokenizer or tiny_tokenizer(), prompts=TEXTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_export_reads_back_to_the_pruned_logits(family, tmp_path):
    model = uniform(family)
    for qtype, limit in (("F32", 1e-6), ("F16", export.FLOAT_TOLERANCE["F16"]), ("BF16", export.FLOAT_TOLERANCE["BF16"])):
        info = written(model, tmp_path / f"{qtype}.gguf", qtype)
        assert info["architecture"] == get_arch(family) and not info["per_layer_widths"]
        g = gap(model, export.read_gguf(tmp_path / f"{qtype}.gguf", model))
        assert g["relative"] <= limit, (qtype, g)
        export.check_float(qtype, g, tmp_path / f"{qtype}.gguf")  # does not raise
    written(model, tmp_path / "q8.gguf", "Q8_0")
    q8 = gap(model, export.read_gguf(tmp_path / "q8.gguf", model))
    assert 0 < q8["max_abs_logit_diff"] and q8["relative"] < 0.2  # quantised: close, not equal


def get_arch(family):
    return {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2": "qwen2", "mistral": "llama"}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_own_gguf_loader_reads_the_export(family, tmp_path):
    """An independent reader (transformers' GGUF loader: llama.cpp's names, its q/k order, Gemma's 1 + w norms)
    gives the checkpoint's logits from the F32 file."""
    from transformers import AutoModelForCausalLM

    model = uniform(family)
    written(model, tmp_path / "m.gguf", "F32")
    kwargs = {"attn_implementation": "eager"} if family.startswith("gemma") else {}
    # transformers' loader maps tensors by the config's model_type and knows no "mistral": the file says "llama"
    # (llama.cpp reads Mistral as Llama), so that reader gets the config the file describes
    config = None if family == "mistral" else model.config
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", config=config, **kwargs).eval()
    ids = tiny_tokenizer()(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_global_llama_exports_as_deci_with_per_layer_widths(tmp_path):
    model = tiny_model("llama")
    apply_mask(model, random_keep(model, ("mlp", "attention"), "global"), "global")
    info = written(model, tmp_path / "m.gguf", "F16")
    assert info["architecture"] == "deci" and info["per_layer_widths"]
    declared = export.gguf_widths(tmp_path / "m.gguf")
    from diet.adapters import get_adapter

    a = get_adapter(model)
    assert declared["feed_forward_length"] == [a.mlp_projections(i)[1].in_features for i in range(a.num_layers)]
    assert declared["attention.head_count_kv"] == [a.num_kv_heads(i) for i in range(a.num_layers)]
    assert len(set(declared["feed_forward_length"])) > 1
    g = gap(model, export.read_gguf(tmp_path / "m.gguf", model))
    assert g["relative"] <= export.FLOAT_TOLERANCE["F16"] and g["top1_agreement"] == 1.0


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2"])
def test_a_global_checkpoint_of_a_family_without_per_layer_gguf_is_refused(family, tmp_path):
    model = tiny_model(family)
    apply_mask(model, random_keep(model, ("mlp",), "global"), "global")
    with pytest.raises(ModelError) as e:
        written(model, tmp_path / "m.gguf", "F16")
    assert "differ per layer" in e.value.problem and "select.layout: uniform" in e.value.fix
    assert not list(tmp_path.iterdir())  # nothing written


def test_output_biases_export_where_llama_cpp_has_the_tensor_and_are_refused_elsewhere(tmp_path):
    llama = tiny_model("llama")
    apply_mask(llama, random_keep(llama, ("mlp",), "uniform"), "uniform", means=random_means(tiny_model("llama")))
    assert llama.config.mlp_bias
    written(llama, tmp_path / "l.gguf", "F32")
    assert gap(llama, export.read_gguf(tmp_path / "l.gguf", llama))["max_abs_logit_diff"] < 1e-5
    qwen = tiny_model("qwen2")
    apply_mask(qwen, random_keep(qwen, ("mlp",), "uniform"), "uniform", means=random_means(tiny_model("qwen2")))
    with pytest.raises(ModelError, match="output biases") as e:
        written(qwen, tmp_path / "q.gguf", "F32")
    assert "prune.recover: none" in e.value.fix and not (tmp_path / "q.gguf").exists()


def test_feed_forward_widths_are_padded_to_whole_blocks_with_channels_that_add_nothing(tmp_path):
    import gguf

    model = tiny_model("llama")  # intermediate 64: keep 40 channels, so down_proj's rows are 40 long
    apply_mask(model, {"mlp": [torch.arange(40)] * model.config.num_hidden_layers}, "uniform")
    for qtype in ("Q8_0", "Q4_1"):
        info = written(model, tmp_path / f"{qtype}.gguf", qtype)
        assert info["padded_layers"] == [0, 1, 2] and not info["f16_fallback"]
        assert export.gguf_widths(tmp_path / f"{qtype}.gguf")["feed_forward_length"] == 64
        tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{qtype}.gguf").tensors}
        for name in ("blk.0.ffn_gate.weight", "blk.2.ffn_up.weight"):
            t = tensors[name]
            assert t.tensor_type.name == qtype
            rows = gguf.quants.dequantize(t.data, t.tensor_type).reshape(64, -1)
            assert not rows[40:].any() and rows[:40].any()  # silu(0) * 0: the padded channels output exactly 0
        limit = 0.2 if qtype == "Q8_0" else 0.6  # 4 bits on a tiny random model: near, far from equal
        assert gap(model, export.read_gguf(tmp_path / f"{qtype}.gguf", model))["relative"] < limit
    f16 = written(model, tmp_path / "f16.gguf", "F16")  # a float type needs no whole blocks: no padding
    assert f16["padded_layers"] == [] and export.gguf_widths(tmp_path / "f16.gguf")["feed_forward_length"] == 40


def test_rows_that_cannot_be_padded_fall_back_to_f16_and_are_listed(tmp_path):
    model = tiny_model("llama")  # hidden 32 -> 24: every row along the residual stream is 24 long
    apply_mask(model, {"hidden": [torch.arange(24)]}, "uniform")
    info = written(model, tmp_path / "m.gguf", "Q8_0")
    assert "blk.0.ffn_up.weight" in info["f16_fallback"] and "token_embd.weight" in info["f16_fallback"]
    assert gap(model, export.read_gguf(tmp_path / "m.gguf", model))["relative"] < 0.05
    assert not written(tiny_model("llama"), tmp_path / "n.gguf", "Q8_0")["f16_fallback"]  # rows of 32 and 64


def test_four_bit_files_keep_the_embedding_at_eight_bits(tmp_path):
    import gguf

    model = uniform("qwen2")  # untied: both the embedding and the head
    written(model, tmp_path / "m.gguf", "Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_sentencepiece_style_tokenizer_round_trips_through_the_gguf(family, tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    written(uniform(family), tmp_path / "m.gguf", "F16", tok)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert export.tokenizer_fields(tok, VOCAB)[0][1] == "llama"


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40]))
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_a_byte_level_tokenizer_round_trips_as_gpt2_with_its_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_level_tokenizer()
    assert len(tok) <= VOCAB
    fields = dict((k, v) for k, v, *_ in export.tokenizer_fields(tok, VOCAB))
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert fields["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # control
    written(uniform("qwen2"), tmp_path / "m.gguf", "F16", tok)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.eos_token == tok.eos_token


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    with pytest.raises(ModelError, match="tokens"):
        export.tokenizer_fields(tiny_tokenizer(), 16)


def test_a_file_from_another_checkpoint_is_refused_when_read_back(tmp_path):
    written(uniform("llama", seed=0), tmp_path / "a.gguf", "F16")
    other = tiny_model("llama")  # dense: other widths
    with pytest.raises(ModelError, match="feed_forward_length|head_count"):
        export.read_gguf(tmp_path / "a.gguf", other)
    (tmp_path / "b.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        export.read_gguf(tmp_path / "b.gguf", other)


def test_a_broken_float_export_fails_its_check(tmp_path):
    with pytest.raises(ModelError, match="beyond F16 rounding"):
        export.check_float("F16", {"relative": 0.5, "max_abs_logit_diff": 3.0, "top1_agreement": 0.5},
                           tmp_path / "m.gguf")
    export.check_float("Q4_0", {"relative": 0.5, "max_abs_logit_diff": 3.0, "top1_agreement": 0.5},
                       tmp_path / "m.gguf")  # a quantised type is measured, not held to a float tolerance


def test_export_params_are_checked_when_read():
    from diet.config import Params

    assert Params.from_dict({"export": {"types": ["F16", "Q4_0"]}}).export.types == ("F16", "Q4_0")
    for bad, needle in (({"types": ["Q4_K"]}, "not supported"), ({"types": "F16"}, "must be a list"),
                        ({"types": ["F16", "F16"]}, "twice"), ({"perplexity_docs": -1}, ">= 0"),
                        ({"perplexity_docs": 1.5}, "integer"), ({"type": ["F16"]}, "unknown params key")):
        with pytest.raises(ConfigError, match=needle):
            Params.from_dict({"export": bad})


# --- the stage ---------------------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A folder holding a tiny base model and a checkpoint pruned from it, as the pipeline lays them out."""
    from diet.checkpoint import save_pruned
    from diet.scorefile import model_fingerprint

    base = tiny_model("llama")
    tok = tiny_tokenizer()
    (tmp_path / "models").mkdir()
    base.save_pretrained(tmp_path / "models/base")
    tok.save_pretrained(tmp_path / "models/base")
    pruned = uniform("llama")
    manifest = {"base_model_fingerprint": model_fingerprint(tmp_path / "models/base"),
                "mask": {"achieved_sparsity": 0.2, "target_sparsity": 0.2, "layout": "uniform"},
                "method": "vote", "tasks": ["arc_easy"]}
    save_pruned(pruned, tok, tmp_path / "models/pruned", manifest)
    (tmp_path / "params.yaml").write_text("export:\n  types: [F16, Q8_0]\n  perplexity_docs: 0\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv=()):
    from stages._common import run_stage
    from stages.export import main, parser

    return run_stage(main, parser(), list(argv))


def test_the_stage_writes_checked_files_a_summary_metrics_and_a_card(repo):
    assert run() == 0
    summary = json.loads((repo / "models/gguf/export.json").read_text())
    assert set(summary["files"]) == {"F16", "Q8_0"} and summary["architecture"] == "llama"
    assert summary["tokenizer"] == "converted from the tokenizer files"
    for qtype, f in summary["files"].items():
        path = repo / "models/gguf" / f["file"]
        assert path.stat().st_size == f["bytes"] and f["logits"]["top1_agreement"] > 0.5
    assert summary["files"]["F16"]["logits"]["relative"] <= export.FLOAT_TOLERANCE["F16"]
    metrics = json.loads((repo / "metrics/export.json").read_text())
    assert set(metrics) == {"F16", "Q8_0"} and metrics["Q8_0"]["mb"] > 0
    card = (repo / "models/gguf/README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card and "llama-cli -m model-F16.gguf" in card
    assert "diet-vote" in card


def test_the_stage_with_no_types_writes_an_empty_summary(repo):
    (repo / "params.yaml").write_text("export:\n  types: []\n")
    assert run() == 0
    assert json.loads((repo / "models/gguf/export.json").read_text()) == {"types": [], "files": {}}
    assert not list((repo / "models/gguf").glob("*.gguf"))


@pytest.mark.parametrize("damage, needle", [
    (lambda r: (r / "models/pruned/manifest.json").unlink(), "no manifest.json"),
    (lambda r: (r / "models/pruned/manifest.json").write_text(json.dumps(
        {**json.loads((r / "models/pruned/manifest.json").read_text()), "base_model_fingerprint": "0" * 64})),
     "not pruned from this base model"),
    (lambda r: (r / "params.yaml").write_text("export:\n  types: [Q3_K]\n"), "not supported"),
])
def test_the_stage_refuses_bad_input_and_writes_nothing(repo, damage, needle, capsys):
    damage(repo)
    assert run() == 2
    assert needle in capsys.readouterr().err
    assert not (repo / "models/gguf").exists() and not (repo / "metrics").exists()


def test_an_output_inside_another_stages_output_is_refused(repo, capsys):
    (repo / "dvc.yaml").write_text("stages:\n  report:\n    cmd: x\n    outs:\n      - results/table.md\n"
                                   "  evaluate:\n    foreach: [a]\n    do:\n      cmd: x\n      outs:\n"
                                   "        - results/pruned/tasks/${item}.json\n")
    for out in ("models/pruned/gguf", "models", "results/pruned/tasks/gguf"):
        assert run(["--out", out]) == 2
        err = capsys.readouterr().err
        assert "another stage's output or an input" in err and "--out models/gguf" in err
    assert not (repo / "models/pruned/gguf").exists() and not (repo / "results").exists()
    assert (repo / "models/pruned/manifest.json").is_file()

