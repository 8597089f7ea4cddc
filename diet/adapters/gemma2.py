"""Gemma-2: Llama layout; needs BOS, and eager attention (sdpa has no logit softcapping)."""

from diet.adapters.llama import LlamaAdapter


class Gemma2Adapter(LlamaAdapter):
    model_type = "gemma2"
    config_class_name = "Gemma2Config"
    model_class_name = "Gemma2ForCausalLM"
    needs_bos = True
    BIAS_FLAGS = {"attention": "attention_bias"}  # on q/k/v/o; the MLP has no bias flag
    attn_implementation = "eager"
