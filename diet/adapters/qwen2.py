"""Qwen2: Llama layout; q/k/v carry biases, sliced with their rows; o_proj and the MLP have no bias flag."""

from diet.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    model_type = "qwen2"
    config_class_name = "Qwen2Config"
    model_class_name = "Qwen2ForCausalLM"
    stock_config_checks_heads = False
    BIAS_FLAGS = {}  # q/k/v always carry biases, o_proj and the MLP never: no flag
    gguf_arch = "qwen2"
    gguf_arch_per_layer = None
    gguf_rope_interleaved = False
