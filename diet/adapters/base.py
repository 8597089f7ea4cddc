"""Where a model family's weights and heads are: the one interface algorithm code uses to reach them.

Scoring, selection and pruning never name a model-specific module: they ask an adapter. Each family has one
small subclass, chosen by ``config.model_type`` through the lazy registry in ``diet.adapters``. A new family
(docs/extending.md) is one file that subclasses this class (or ``LlamaAdapter`` when its layers are laid out
like Llama's) and says:

* the stock classes: ``model_type``, ``config_class_name``, ``model_class_name``;
* where the weights are: ``decoder_layers``, ``mlp_projections`` (gate/up, down), ``attention_projections``
  (q, k, v, o), ``residual_norms``, ``branch_norms`` (Gemma), ``final_norm``;
* the heads: ``head_dim``, ``num_heads``, ``num_kv_heads``;
* its facts: ``needs_bos``, ``BIAS_FLAGS``, ``PRUNABLE_GROUPS``, ``norm_offset``, ``embed_scale_exponent``,
  ``attn_implementation``, the GGUF architecture (``gguf_arch``, ``gguf_arch_per_layer``,
  ``gguf_rope_interleaved``, ``gguf_metadata``), and ``sync_module_attributes`` for module attributes that
  mirror a width;

plus its name in ``diet.adapters.SUPPORTED``. Everything else is written once in terms of these: what a
dimension of each group owns (``diet.groups``, slices as data), keep sets and slicing (``diet.keep``,
``diet.slicing``), output biases (``diet.biases``), the config of a pruned model (``diet.modeling``).

Residual stream (the ``hidden`` group): ``residual_norms`` are the norms whose input is the residual stream,
``branch_norms`` Gemma's norms on a branch's output before it is added, ``final_norm`` the one before the head;
``norm_offset`` says how a norm applies its weight (0 for ``weight * x``, 1 for Gemma's ``(1 + weight) * x``) and
``embed_scale_exponent`` how the embedding is scaled by the width (Gemma multiplies it by
``hidden_size ** 0.5`` from the config).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

from torch import nn

from diet.errors import ConfigError, ModelError
from diet.groups import GROUPS


class ModelAdapter(ABC):
    """Where each dimension group's weights live in one model family."""

    model_type: ClassVar[str]
    #: families whose tokenizer must prepend BOS for sane log-likelihoods (Gemma)
    needs_bos: ClassVar[bool] = False
    #: whether the family's stock config refuses ``hidden_size % num_attention_heads != 0`` (Qwen2's and
    #: Mistral's do not check it): what stock transformers does with per-layer head counts (diet.cards)
    stock_config_checks_heads: ClassVar[bool] = True
    #: attention implementation to load with (None: the transformers default)
    attn_implementation: ClassVar[str | None] = None
    #: stock transformers classes of the family, by name in the ``transformers`` namespace
    config_class_name: ClassVar[str]
    model_class_name: ClassVar[str]
    #: group -> stock config flag that gives the group's output projection (and its other projections) a bias
    BIAS_FLAGS: ClassVar[dict[str, str]] = {}
    #: the dimension groups this family can score and prune (``check_groups``)
    PRUNABLE_GROUPS: ClassVar[tuple[str, ...]] = tuple(GROUPS)
    #: a norm's gain is ``norm_offset + weight`` (Gemma: 1)
    norm_offset: ClassVar[float] = 0.0
    #: the embedding's output is multiplied by ``config.hidden_size ** embed_scale_exponent`` (Gemma: 0.5)
    embed_scale_exponent: ClassVar[float] = 0.0
    #: llama.cpp's architecture for the family (GGUF export, ``diet.export``), and the one that reads per-layer
    #: widths (None: the family's checkpoints export with one width for every layer only)
    gguf_arch: ClassVar[str]
    gguf_arch_per_layer: ClassVar[str | None] = None
    #: llama.cpp rotates interleaved pairs for this architecture: q/k rows are permuted on export (Llama)
    gguf_rope_interleaved: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def config(self):
        return self.model.config

    def rope_theta(self) -> float:
        """The rotary base of the (full-attention) layers; a ModelError for a scaled rotary embedding, which GGUF
        export does not write."""
        params = getattr(self.config, "rope_parameters", None) or {}
        params = params.get("full_attention", params)
        if params.get("rope_type", "default") != "default":
            raise ModelError(f"the model's rotary embedding is scaled ({params.get('rope_type')!r}); GGUF export "
                             "writes the default rotary embedding only", "export a model without rope scaling")
        return float(params.get("rope_theta", getattr(self.config, "rope_theta", 10000.0)))

    def gguf_metadata(self) -> dict[str, object]:
        """The family's extra GGUF keys, by ``gguf.GGUFWriter.add_<key>`` name."""
        return {}

    # -- structure -------------------------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> Sequence[nn.Module]:
        """The decoder layers, in order."""

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @abstractmethod
    def mlp_projections(self, layer: int) -> tuple[list[nn.Linear], nn.Linear]:
        """(input projections whose *rows* are channels, e.g. [gate, up]; output projection whose *columns* are channels)."""

    @abstractmethod
    def attention_projections(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q_proj, k_proj, v_proj, o_proj) of one layer."""

    @abstractmethod
    def head_dim(self) -> int:
        """Per-head width (the same in every layer)."""

    @abstractmethod
    def num_heads(self, layer: int) -> int:
        """Query heads in ``layer`` (after pruning, may differ per layer)."""

    @abstractmethod
    def num_kv_heads(self, layer: int) -> int:
        """KV heads in ``layer``."""

    def heads_per_group(self, layer: int) -> int:
        return self.num_heads(layer) // self.num_kv_heads(layer)

    def hidden_size(self) -> int:
        """Width of the residual stream, read from the embedding."""
        return self.model.get_input_embeddings().weight.shape[1]

    @abstractmethod
    def residual_norms(self, layer: int) -> list[nn.Module]:
        """The norms of ``layer`` whose input is the residual stream (before attention, before the MLP)."""

    def branch_norms(self, layer: int) -> list[nn.Module]:
        """Hidden-wide norms of ``layer`` applied to a branch's output before it joins the residual (Gemma)."""
        return []

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm between the last layer and the output head."""

    @classmethod
    def check_groups(cls, groups: Sequence[str], key: str = "prune.groups") -> None:
        """Refuse groups this family cannot prune (ConfigError naming ``key``), from the class alone: call it
        with the model_type of a config, before any weight is read."""
        refused = [g for g in groups if g not in cls.PRUNABLE_GROUPS]
        if refused:
            rest = [g for g in groups if g in cls.PRUNABLE_GROUPS]
            raise ConfigError(f"{key} includes {', '.join(refused)}, which the {cls.model_type} adapter cannot "
                              f"prune (it prunes {', '.join(cls.PRUNABLE_GROUPS)})",
                              f"set {key} to {rest}" if rest else
                              f"use groups from: {', '.join(cls.PRUNABLE_GROUPS)}")

    def sync_module_attributes(self) -> None:
        """Refresh module attributes that mirror a width (family hook; the weights are already sliced)."""
