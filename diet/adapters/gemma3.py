"""Gemma-3 text-only (Gemma3ForCausalLM): Llama layout with Gemma-2's residual norms and scaled embedding
(``GemmaResidual``); needs BOS. Its q_norm / k_norm act on head_dim, so removing whole heads or residual
channels leaves them as they are."""

from diet.adapters.gemma2 import GemmaResidual
from diet.adapters.llama import LlamaAdapter


class Gemma3TextAdapter(GemmaResidual, LlamaAdapter):
    model_type = "gemma3_text"
    config_class_name = "Gemma3TextConfig"
    model_class_name = "Gemma3ForCausalLM"
    needs_bos = True
    BIAS_FLAGS = {"attention": "attention_bias"}  # on q/k/v/o; the MLP has no bias flag
    gguf_arch = "gemma3"
