"""The one interface algorithm code uses to reach a model family's weights.

Scoring, selection and pruning never name a model-specific module: they ask an adapter. Each family
(``llama``, ``gemma2``, ``gemma3_text``, ``qwen2``) has one small subclass, chosen by ``config.model_type``
through the lazy registry in ``diet.adapters``; a subclass says where the weights are, and the keep-set
checks, weight slicing and config update below are shared.

Dimension groups (DESIGN.md):

* ``mlp``: intermediate channel ``j`` of layer ``l`` = row ``j`` of gate_proj and up_proj and column ``j``
  of down_proj. Its activation is the input of down_proj, shape (B, T, I_l).
* ``attention``: KV group ``g`` of layer ``l`` = KV head ``g`` (rows of k_proj / v_proj) plus the
  ``heads_per_group`` query heads that share it (rows of q_proj, columns of o_proj). Its activation is the
  input of o_proj, shape (B, T, n_heads_l * head_dim), heads contiguous.

Output biases (``prune.recover: bias``): a group's *output projection* (down_proj, o_proj) may gain a bias.
Where the family's stock config has a flag that gives it one (``BIAS_FLAGS``; Llama's ``mlp_bias`` and
``attention_bias`` give *all* the group's projections a bias), ``write_config`` sets the flag and gives the
group's other projections zero biases, so the checkpoint stays stock. Where it has none, the model becomes
the per-layer ``diet_<family>`` type, whose config lists the groups in ``output_biases``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from torch import nn

from diet.errors import ModelError
from diet.pruning import slice_linear

GROUPS = ("mlp", "attention")


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

    def group_projections(self, group: str, layer: int) -> list[nn.Linear]:
        """Every projection of ``group`` in ``layer``, the output projection last."""
        if group == "mlp":
            ins, out = self.mlp_projections(layer)
            return [*ins, out]
        if group == "attention":
            return list(self.attention_projections(layer))
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")

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

    def output_channels(self, group: str, layer: int, dims: torch.Tensor) -> torch.Tensor:
        """Input channels of ``group``'s output projection (columns of down_proj / o_proj) that belong to the
        dimensions ``dims`` of ``layer``: the same indices for ``mlp``, the query heads' channels of each KV
        group for ``attention`` (``attention_rows``)."""
        if group == "mlp":
            return dims.to(torch.long)
        if group == "attention":
            return self.attention_rows(layer, dims)["q"]
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")

    def add_output_bias(self, group: str, layer: int, delta: torch.Tensor) -> None:
        """Add ``delta`` (H,) to the bias of ``group``'s output projection in ``layer`` (created at zero if
        absent), summing in float64."""
        lin = self.activation_module(group, layer)  # the output projection: its input is the group's activation
        _ensure_bias(lin)
        new = lin.bias.detach().double() + delta.to(device=lin.bias.device, dtype=torch.float64)  # (H,)
        lin.bias = nn.Parameter(new.to(lin.weight.dtype), requires_grad=lin.bias.requires_grad)

    def output_bias_groups(self) -> list[str]:
        """Groups whose output projection carries a bias in any layer."""
        return [g for g in GROUPS if any(self.activation_module(g, i).bias is not None for i in range(self.num_layers))]

    def ensure_output_biases(self, groups: Sequence[str]) -> None:
        """Give the output projection of every layer of ``groups`` a (zero) bias where it has none."""
        for group in groups:
            for layer in range(self.num_layers):
                _ensure_bias(self.activation_module(group, layer))

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
                    _ensure_bias(lin)
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
            widths = self.group_widths(group)
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

    def attention_rows(self, layer: int, kv_groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight rows of ``kv_groups`` in ``layer``: ``q`` (rows of q_proj = columns of o_proj), ``kv`` (rows of k/v).

        With head_dim ``d`` and ``r`` query heads per KV group, group ``g`` owns k/v rows [g*d, (g+1)*d) and
        query heads [g*r, (g+1)*r), i.e. q rows [g*r*d, (g+1)*r*d): repeat_kv expands KV head ``g`` to the
        ``r`` consecutive query heads.
        """
        d, r = self.head_dim(), self.heads_per_group(layer)
        g = kv_groups.to(torch.long)[:, None]  # (G, 1)
        kv = (g * d + torch.arange(d)).flatten()  # (G*d,)
        q = (g * r * d + torch.arange(r * d)).flatten()  # (G*r*d,)
        return {"q": q, "kv": kv}

    def slice_weights(self, keep: dict[str, list[torch.Tensor]]) -> None:
        """Remove the dimensions not in ``keep`` from the weights only (``keep`` already checked; the config is
        left alone). Also used to shape freshly built per-layer-width models, possibly on the meta device."""
        for layer, kept in enumerate(keep.get("mlp", [])):
            ins, out = self.mlp_projections(layer)
            for lin in ins:
                slice_linear(lin, kept, "out")
            slice_linear(out, kept, "in")
        for layer, kept in enumerate(keep.get("attention", [])):
            rows = self.attention_rows(layer, kept)  # computed before slicing changes the head counts
            q, k, v, o = self.attention_projections(layer)
            slice_linear(q, rows["q"], "out")
            slice_linear(k, rows["kv"], "out")
            slice_linear(v, rows["kv"], "out")
            slice_linear(o, rows["q"], "in")
        self.sync_module_attributes()

    def sync_module_attributes(self) -> None:
        """Refresh module attributes that mirror a width (family hook; the weights are already sliced)."""

    def layer_widths(self) -> dict[str, list[int]]:
        """Per-layer widths read from the weights, keyed by the config field each one sets."""
        n = range(self.num_layers)
        return {"intermediate_size": self.group_widths("mlp"),
                "num_attention_heads": [self.num_heads(i) for i in n],
                "num_key_value_heads": [self.num_kv_heads(i) for i in n]}

    def widths_after(self, keep: dict[str, list[torch.Tensor]]) -> dict[str, list[int]]:
        """The per-layer widths that ``prune(keep)`` would give, without touching the model."""
        widths = self.layer_widths()
        if "mlp" in keep:
            widths["intermediate_size"] = [len(k) for k in keep["mlp"]]
        if "attention" in keep:
            widths["num_key_value_heads"] = [len(k) for k in keep["attention"]]
            widths["num_attention_heads"] = [len(k) * self.heads_per_group(i) for i, k in enumerate(keep["attention"])]
        return widths

    def write_config(self) -> None:
        """Make the config describe the weights.

        Uniform widths that stock transformers accepts give a stock config (``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads``; ``head_dim`` stays explicit). Otherwise the model and
        config become the registered ``diet_<family>`` types that also carry the per-layer lists; their scalar
        fields hold the widest layer.
        """
        from diet.modeling import OUTPUT_BIASES_FIELD, PER_LAYER_FIELDS, retype, stock_config_problem

        widths = self.layer_widths()
        unflagged = self.carry_output_biases()
        uniform = all(len(set(v)) == 1 for v in widths.values())
        per_layer = not uniform or bool(unflagged) or stock_config_problem(self.config, widths) is not None
        retype(self.model, per_layer=per_layer)
        for name, values in widths.items():
            setattr(self.config, name, max(values))
            if per_layer:
                setattr(self.config, PER_LAYER_FIELDS[name], list(values))
        if per_layer:
            setattr(self.config, OUTPUT_BIASES_FIELD, unflagged or None)

    def prune(self, keep: dict[str, list[torch.Tensor]]) -> None:
        """Physically remove every dimension not in ``keep[group][layer]`` (LongTensor of kept indices).

        Slices weights in place, keeps ``in_features``/``out_features`` true and updates the config
        (per-layer widths) so that the model saves and reloads.
        """
        self.slice_weights(self.check_keep(keep))
        self.write_config()


def _ensure_bias(lin: nn.Linear) -> None:
    """Give ``lin`` a zero bias (out_features,) on its weight's device and dtype if it has none."""
    if lin.bias is None:
        w = lin.weight
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)
