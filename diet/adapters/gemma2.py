"""Gemma-2: Llama layout; needs BOS, and eager attention (sdpa has no logit softcapping).

Gemma-2 and Gemma-3 share the residual layout ``GemmaResidual`` describes: four norms per layer (pre- and
post-norm around each branch), gains ``1 + weight``, and the embedding multiplied by ``sqrt(hidden_size)`` taken
from the config (a buffer of the embedding module, refreshed here when the width changes).
"""

from __future__ import annotations

import torch
from torch import nn

from diet.adapters.llama import LlamaAdapter


class GemmaResidual:
    """Residual-stream facts of the Gemma families (mixed into their adapters)."""

    norm_offset = 1.0
    embed_scale_exponent = 0.5

    def residual_norms(self, layer: int) -> list[nn.Module]:
        block = self.decoder_layers()[layer]
        return [block.input_layernorm, block.pre_feedforward_layernorm]

    def branch_norms(self, layer: int) -> list[nn.Module]:
        block = self.decoder_layers()[layer]
        return [block.post_attention_layernorm, block.post_feedforward_layernorm]

    gguf_arch_per_layer = None
    gguf_rope_interleaved = False

    def gguf_metadata(self) -> dict[str, object]:
        """Sliding window, its per-layer pattern (True: a sliding layer) and the soft-capping llama.cpp reads."""
        config = self.config
        out: dict[str, object] = {}
        if getattr(config, "sliding_window", None):
            out["sliding_window"] = int(config.sliding_window)
            types = getattr(config, "layer_types", None) or []
            if types:
                out["sliding_window_pattern"] = [t == "sliding_attention" for t in types]
        params = getattr(config, "rope_parameters", None) or {}
        if "sliding_attention" in params:
            out["rope_freq_base_swa"] = float(params["sliding_attention"].get("rope_theta"))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is not None:
                out[key] = float(getattr(config, key))
        return out

    def sync_module_attributes(self) -> None:
        super().sync_module_attributes()
        emb = self.model.get_input_embeddings()
        scale = self.hidden_size() ** self.embed_scale_exponent  # what the config's hidden_size will give
        if getattr(emb, "scalar_embed_scale", scale) == scale:
            return  # width unchanged: leave the buffer (and its dtype's rounding) alone
        emb.scalar_embed_scale = scale
        if isinstance(getattr(emb, "embed_scale", None), torch.Tensor) and emb.embed_scale.device.type != "meta":
            emb.embed_scale.fill_(scale)


class Gemma2Adapter(GemmaResidual, LlamaAdapter):
    model_type = "gemma2"
    config_class_name = "Gemma2Config"
    model_class_name = "Gemma2ForCausalLM"
    needs_bos = True
    BIAS_FLAGS = {"attention": "attention_bias"}  # on q/k/v/o; the MLP has no bias flag
    attn_implementation = "eager"
    gguf_arch = "gemma2"
