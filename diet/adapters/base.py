"""The one interface algorithm code uses to reach a model family's weights.

Scoring, selection and pruning never name a model-specific module: they ask an adapter. Each family
(``llama``, ``gemma2``, ``gemma3_text``, ``qwen2``) has one small subclass, chosen by ``config.model_type``
through the lazy registry in ``diet.adapters``; a subclass says where the weights are, and the keep-set
checks and weight slicing below are shared (the config update is ``diet.modeling.write_config``).

Dimension groups: the rules of each group (widths, cost, slicing, which activation feeds it) live in
``diet.groups``, one object per group, written in terms of what every adapter provides (the projections,
head sizes); the adapter's group views below only delegate to the group named.

Residual stream (the ``hidden`` group): an adapter also says where the embedding's hidden-wide norms are
(``residual_norms``: the norms whose input is the residual stream; ``branch_norms``: Gemma's norms on a branch's
output before it is added; ``final_norm``), how a norm applies its weight (``norm_offset``: 0 for ``weight * x``,
1 for Gemma's ``(1 + weight) * x``) and how the embedding is scaled by the width (``embed_scale_exponent``:
Gemma multiplies it by ``hidden_size ** 0.5`` from the config).

Output biases (``prune.recover: bias``): a group's *output projection* (down_proj, o_proj) may gain a bias.
Where the family's stock config has a flag that gives it one (``BIAS_FLAGS``; Llama's ``mlp_bias`` and
``attention_bias`` give *all* the group's projections a bias), ``carry_output_biases`` sets the flag and gives
the group's other projections zero biases, so the checkpoint stays stock. Where it has none, the model becomes
the per-layer ``diet_<family>`` type, whose config lists the groups in ``output_biases``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

from diet.errors import ConfigError, ModelError
from diet.groups import GROUPS, ensure_bias, get_group


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

    # -- group views: the rules live in ``diet.groups``; these delegate to the group named --------------------
    def group_projections(self, group: str, layer: int) -> list[nn.Linear]:
        """Every projection of ``group`` in ``layer``, the output projection last."""
        return get_group(group).projections(self, layer)

    def group_widths(self, group: str) -> list[int]:
        """Number of prunable dimensions of ``group`` in each layer."""
        return get_group(group).widths(self)

    def dimension_cost(self, group: str, layer: int) -> int:
        """Parameters removed with one dimension of ``group`` in ``layer`` (weights and biases)."""
        return get_group(group).cost(self, layer)

    def activation_module(self, group: str, layer: int) -> nn.Linear:
        """The module whose *input* is the activation that feeds ``group``'s dimensions (hook target)."""
        return get_group(group).output_projection(self, layer)

    def output_channels(self, group: str, layer: int, dims: torch.Tensor) -> torch.Tensor:
        """Input channels of ``group``'s output projection (columns of down_proj / o_proj) that belong to the
        dimensions ``dims`` of ``layer`` (``DimensionGroup.output_channels``)."""
        return get_group(group).output_channels(self, layer, dims)

    def attention_rows(self, layer: int, kv_groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight rows of ``kv_groups`` in ``layer`` (``AttentionGroup.rows``)."""
        return GROUPS["attention"].rows(self, layer, kv_groups)

    def add_output_bias(self, group: str, layer: int, delta: torch.Tensor) -> None:
        """Add ``delta`` (H,) to the bias of ``group``'s output projection in ``layer`` (created at zero if
        absent), summing in float64."""
        lin = self.activation_module(group, layer)  # the output projection: its input is the group's activation
        ensure_bias(lin)
        new = lin.bias.detach().double() + delta.to(device=lin.bias.device, dtype=torch.float64)  # (H,)
        lin.bias = nn.Parameter(new.to(lin.weight.dtype), requires_grad=lin.bias.requires_grad)

    def output_bias_groups(self) -> list[str]:
        """Groups (of those with an output projection per layer) whose output projection carries a bias in any
        layer."""
        return [name for name, g in GROUPS.items() if g.recoverable
                and any(self.activation_module(name, i).bias is not None for i in range(self.num_layers))]

    def ensure_output_biases(self, groups: Sequence[str]) -> None:
        """Give the output projection of every layer of ``groups`` a (zero) bias where it has none."""
        for group in groups:
            for layer in range(self.num_layers):
                ensure_bias(self.activation_module(group, layer))

    def carry_output_biases(self) -> list[str]:
        """Make the config describe the output biases; returns the groups no stock flag can carry.

        A group with a flag in ``BIAS_FLAGS`` gets the flag set and zero biases on every projection the flag
        governs (and every layer), so stock transformers builds the same parameters.
        """
        unflagged = []
        for group in self.output_bias_groups():
            flag = self.BIAS_FLAGS.get(group)
            if flag is None:
                unflagged.append(group)
                continue
            setattr(self.config, flag, True)
            for layer in range(self.num_layers):
                for lin in self.group_projections(group, layer):
                    ensure_bias(lin)
        self.ensure_output_biases(unflagged)
        return unflagged

    def decoder_param_count(self) -> int:
        return sum(p.numel() for layer in self.decoder_layers() for p in layer.parameters())

    # -- pruning -------------------------------------------------------------------------------------------------
    def check_keep(self, keep: dict[str, Sequence[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Validate a keep set against this model; returns it as sorted, unique LongTensors per layer."""
        out: dict[str, list[torch.Tensor]] = {}
        for group, per_layer in keep.items():
            if group not in GROUPS:
                raise ModelError(f"unknown dimension group {group!r} in the mask", f"use: {', '.join(GROUPS)}")
            widths = GROUPS[group].widths(self)
            if len(per_layer) != len(widths):
                raise ModelError(f"the {group} mask has {len(per_layer)} layers, the model has {len(widths)}"
                                 + (" (the group has one mask row for all layers)" if len(widths) == 1 else ""),
                                 "build the mask from this model's scores")
            cleaned = []
            for layer, (idx, width) in enumerate(zip(per_layer, widths)):
                idx = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
                kept = torch.unique(idx)  # sorted
                where = f"{group} mask of layer {layer}"
                if kept.numel() == 0:
                    raise ModelError(f"the {where} keeps nothing", "keep at least one dimension per layer "
                                     "(select.min_keep > 0)")
                if kept.numel() != idx.numel():
                    raise ModelError(f"the {where} lists an index twice", "list each kept index once")
                if kept[0] < 0 or kept[-1] >= width:
                    raise ModelError(f"the {where} has indices outside [0, {width})",
                                     "build the mask from this model's scores")
                cleaned.append(kept)
            out[group] = cleaned
        return out

    def slice_weights(self, keep: dict[str, list[torch.Tensor]]) -> None:
        """Remove the dimensions not in ``keep`` from the weights only (``keep`` already checked; the config is
        left alone: ``diet.modeling.write_config``). Also used to shape freshly built per-layer-width models,
        possibly on the meta device."""
        for name, group in GROUPS.items():
            for layer, kept in enumerate(keep.get(name, [])):
                group.slice(self, layer, kept)
        self.sync_module_attributes()

    def sync_module_attributes(self) -> None:
        """Refresh module attributes that mirror a width (family hook; the weights are already sliced)."""

    def layer_widths(self) -> dict[str, list[int]]:
        """Per-layer widths read from the weights, keyed by the config field each one sets."""
        return {field: values for group in GROUPS.values() for field, values in group.config_widths(self).items()}

    def widths_after(self, keep: dict[str, list[torch.Tensor]]) -> dict[str, list[int]]:
        """The per-layer widths that pruning to ``keep`` would give, without touching the model."""
        widths = self.layer_widths()
        for name, kept in keep.items():
            widths.update(GROUPS[name].config_widths(self, kept))
        return widths


def parameter_counts(model: nn.Module) -> dict:
    """Parameter counts, each shared (tied) tensor counted once.

    ``embedding``: input embeddings plus an untied output head; ``non_embedding`` = total - embedding;
    ``decoder``: the decoder layers (the base of ``prune.sparsity``); ``per_layer``: one count per layer.
    """
    from diet.adapters import get_adapter

    total = sum(p.numel() for p in model.parameters())
    embedding_params = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                        if m is not None}
    embedding = sum(p.numel() for p in embedding_params.values())
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in get_adapter(model).decoder_layers()]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "decoder": sum(per_layer), "per_layer": per_layer}
