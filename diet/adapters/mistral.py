"""Mistral: Llama's layout and weights with no bias anywhere (no bias flag in its config); a sliding window
for long contexts, which leaves the weights' shapes alone."""

from diet.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    model_type = "mistral"
    config_class_name = "MistralConfig"
    model_class_name = "MistralForCausalLM"
    stock_config_checks_heads = False
    BIAS_FLAGS = {}  # no projection carries a bias: recovery adds output biases through the per-layer config
