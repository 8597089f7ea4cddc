"""The one interface algorithm code uses to reach a model family's weights.

Scoring, selection and pruning never name a model-specific module: they ask an adapter. Each family
(``llama``, ``gemma2``, ``gemma3_text``, ``qwen2``) has one small subclass, chosen by ``config.model_type``
through the lazy registry in ``diet.adapters``; a subclass says where the weights are, and the keep-set
checks and weight slicing below are shared (the config update is ``diet.modeling.write_config``).

Dimension groups: the rules of each group (widths, cost, slicing, which activation feeds it) live in
``diet.groups``, one object per group, written in terms of what every adapter provides (the projections,
head sizes); the adapter's group views below only delegate to the group named.

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

from diet.errors import ModelError
from diet.groups import GROUPS, ensure_bias, get_group


class ModelAdapter(ABC):
    """Where each dimension group's weights live in one model family."""

    model_type: ClassVar[str]
    #: families whose tokenizer must prepend BOS for sane log-likelihoods (Gemma)
    needs_bos: ClassVar[bool] = False
    #: attention implementation to load with (None: the transformers default)
    attn_implementation: ClassVar[str | None] = None
    #: stock transformers classes of the family, by name in the ``transformers`` namespace
    config_class_name: ClassVar[str]
    model_class_name: ClassVar[str]
    #: group -> stock config flag that gives the group's output projection (and its other projections) a bias
    BIAS_FLAGS: ClassVar[dict[str, str]] = {}

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
        """Groups whose output projection carries a bias in any layer."""
        return [g for g in GROUPS if any(self.activation_module(g, i).bias is not None for i in range(self.num_layers))]

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
                raise ModelError(f"the {group} mask has {len(per_layer)} layers, the model has {len(widths)}",
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
