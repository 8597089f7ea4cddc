"""The one interface algorithm code uses to reach a model family's weights.

Scoring, selection and pruning never name a model-specific module: they ask an adapter. Each family
(``llama``, ``gemma2``, ``gemma3_text``, ``qwen2``) has one small subclass, chosen by ``config.model_type``
through the lazy registry in ``diet.adapters``.

Dimension groups (DESIGN.md):

* ``mlp``: intermediate channel ``j`` of layer ``l`` = row ``j`` of gate_proj and up_proj and column ``j``
  of down_proj. Its activation is the input of down_proj, shape (B, T, I_l).
* ``attention``: KV group ``g`` of layer ``l`` = KV head ``g`` (rows of k_proj / v_proj) plus the
  ``heads_per_group`` query heads that share it (rows of q_proj, columns of o_proj). Its activation is the
  input of o_proj, shape (B, T, n_heads_l * head_dim), heads contiguous.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

GROUPS = ("mlp", "attention")


class ModelAdapter(ABC):
    """Where each dimension group's weights live in one model family."""

    model_type: ClassVar[str]
    #: families whose tokenizer must prepend BOS for sane log-likelihoods (Gemma)
    needs_bos: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def config(self):
        return self.model.config

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

    # -- group views used by scoring and selection -------------------------------------------------------------
    def group_widths(self, group: str) -> list[int]:
        """Number of prunable dimensions of ``group`` in each layer."""
        if group == "mlp":
            return [self.mlp_projections(i)[1].in_features for i in range(self.num_layers)]
        if group == "attention":
            return [self.num_kv_heads(i) for i in range(self.num_layers)]
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")

    def dimension_cost(self, group: str, layer: int) -> int:
        """Parameters removed with one dimension of ``group`` in ``layer`` (weights and biases)."""
        if group == "mlp":
            ins, out = self.mlp_projections(layer)
            return sum(p.in_features + (1 if p.bias is not None else 0) for p in ins) + out.out_features
        if group == "attention":
            q, k, v, o = self.attention_projections(layer)
            hd, hpg = self.head_dim(), self.heads_per_group(layer)
            per_row = lambda lin: lin.in_features + (1 if lin.bias is not None else 0)  # noqa: E731
            return hd * (hpg * per_row(q) + per_row(k) + per_row(v)) + hpg * hd * o.out_features
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")

    def activation_module(self, group: str, layer: int) -> nn.Linear:
        """The module whose *input* is the activation that feeds ``group``'s dimensions (hook target)."""
        if group == "mlp":
            return self.mlp_projections(layer)[1]
        if group == "attention":
            return self.attention_projections(layer)[3]
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")

    def decoder_param_count(self) -> int:
        return sum(p.numel() for layer in self.decoder_layers() for p in layer.parameters())

    # -- pruning -------------------------------------------------------------------------------------------------
    @abstractmethod
    def prune(self, keep: dict[str, list[torch.Tensor]]) -> None:
        """Physically remove every dimension not in ``keep[group][layer]`` (sorted LongTensor of kept indices).

        Slices weights in place, keeps ``in_features``/``out_features`` true and updates the config
        (per-layer widths) so that the model saves and reloads.
        """
