"""Tiny random models and an in-memory tokenizer for fast, offline tests.

``tiny_model(family)`` builds a float32 model in eval mode for every supported family: hidden 32,
intermediate 64, 3 layers, 4 query heads over 2 KV heads, head_dim 8, vocabulary 128. The initialiser is
wider than the families' defaults so that removing a dimension visibly changes the logits.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from diet.adapters import adapter_class

VOCAB = 128
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
FAMILIES = ("llama", "gemma2", "gemma3_text", "qwen2", "mistral")

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_FAMILY = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3_text": dict(sliding_window=4, query_pre_attn_scalar=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**_COMMON, **_FAMILY[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A seeded random float32 causal LM of family ``model_type``, in eval mode."""
    config = tiny_config(model_type, **overrides)
    attn = adapter_class(model_type).attn_implementation
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.eval()


_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "question: which gas do plants take in? answer: carbon dioxide",
    "a small model is pruned by removing whole dimensions of every layer",
    "pack my box with five dozen liquor jugs, then count 0 1 2 3 4 5 6 7 8 9.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer (at most 128 ids) trained in memory; ids 0-3 are pad, bos, eos, unk."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    assert len(tok) <= VOCAB
    return tok


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer, made to prepend <bos> under add_special_tokens=True (as Gemma's does)."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_token_id)])
    return tok
