"""Llama and the families that share its decoder layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``): Gemma-2, Gemma-3 text and Qwen2 subclass this adapter."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from diet.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_type = "llama"
    config_class_name = "LlamaConfig"
    model_class_name = "LlamaForCausalLM"
    BIAS_FLAGS = {"mlp": "mlp_bias", "attention": "attention_bias"}
    gguf_arch = "llama"
    gguf_arch_per_layer = "deci"  # llama.cpp's Llama variant with per-layer feed-forward and head counts
    gguf_rope_interleaved = True

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.model.model.layers

    def mlp_projections(self, layer: int) -> tuple[list[nn.Linear], nn.Linear]:
        mlp = self.decoder_layers()[layer].mlp
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj

    def attention_projections(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = self.decoder_layers()[layer].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def head_dim(self) -> int:
        return self.decoder_layers()[0].self_attn.head_dim

    def num_heads(self, layer: int) -> int:
        return self.attention_projections(layer)[0].out_features // self.head_dim()

    def num_kv_heads(self, layer: int) -> int:
        return self.attention_projections(layer)[1].out_features // self.head_dim()

    def residual_norms(self, layer: int) -> list[nn.Module]:
        block = self.decoder_layers()[layer]
        return [block.input_layernorm, block.post_attention_layernorm]

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def sync_module_attributes(self) -> None:
        hidden = self.hidden_size()
        for layer in range(self.num_layers):
            block = self.decoder_layers()[layer]
            block.mlp.intermediate_size = self.mlp_projections(layer)[1].in_features
            for module in (block, block.mlp):
                if hasattr(module, "hidden_size"):
                    module.hidden_size = hidden
