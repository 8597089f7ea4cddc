"""Dimension groups: every rule of one kind of prunable dimension, in one object.

A *group* says what one dimension of a layer is, in terms any model family provides through its adapter
(``diet.adapters.base.ModelAdapter``: where the projections are, the head sizes). Scoring, merging, selection,
pruning and checkpoint writing ask a group, never test a group's name:

* ``widths``: dimensions per layer; ``slices``: the rows or columns of each projection that one dimension
  owns, as data (``diet.slicing.Slice``), from which the rest below follows unless a group owns more;
* ``cost``: parameters removed with one dimension of a layer (weights and biases);
* ``projections``: the Linears a dimension owns rows or columns of, the output projection last;
  ``output_projection``: the Linear whose *input* is the group's activation (hook target, recovery bias);
* ``channel_blocks``: how the activation's channels map to dimensions (one each, or contiguous blocks);
  ``output_channels``: the output projection's input columns that belong to some dimensions;
* ``slice``: remove the dimensions not kept from the weights, keeping ``in/out_features`` true;
  ``config_widths`` / ``per_layer_fields``: the config width fields the group sets;
* ``weight_norms`` / ``magnitude``: weight statistics per dimension (``score.weight_norm``, ``merge: magnitude``);
* ``unprunable_reason``: why a model with these widths cannot lose any dimension of the group;
* ``activation_sites`` / ``activation_width``: the modules whose input is the scored activation (hook targets);
  ``reader_weights``: the weights that read its channels (the wanda_sp / flap baselines); ``zero``: the
  reference model with removed dimensions zeroed; ``crossing``: parameters one of its dimensions shares with
  one dimension of another group (the budget counts a shared parameter once); ``recoverable``: whether
  ``prune.recover: bias`` applies.

A group's mask has *rows*: one per decoder layer for ``mlp`` and ``attention``, a single row for ``hidden``
(one mask shared by every layer). ``widths``, ``cost``, scores, priorities and keep lists are all per row, so
``hidden`` fits the same (rows, dimensions) tensors as the others, with one row.

Groups (docs/method.md defines each):

* ``mlp`` (``MlpGroup``): intermediate channel ``j`` of layer ``l`` = row ``j`` of gate_proj and up_proj and
  column ``j`` of down_proj. Its activation is the input of down_proj, shape (B, T, I_l).
* ``attention`` (``AttentionGroup``): KV group ``g`` of layer ``l`` = KV head ``g`` (rows of k_proj / v_proj)
  plus the ``heads_per_group`` query heads that share it (rows of q_proj, columns of o_proj). Its activation is
  the input of o_proj, shape (B, T, n_heads_l * head_dim), heads contiguous.
* ``hidden`` (``HiddenGroup``): residual channel ``c``, one mask row shared by all layers = column ``c`` of the
  embedding (and of an untied head), entry ``c`` of every hidden-wide norm, column ``c`` of every projection
  reading the residual (q/k/v, gate/up) and row ``c`` of every projection writing into it (o_proj, down_proj),
  in every layer. Its activation is the residual stream entering each norm that reads it (each layer's two
  pre-norms and the final norm), accumulated over all of them into one statistic per channel, (B, T, H).
  Removing channels changes the width every RMSNorm averages over; ``HiddenGroup.slice`` folds the
  correction into the weights so that the pruned model computes exactly what the dense model computes with
  those channels zeroed (docs/method.md, "The hidden group").

``GROUPS`` holds one instance per name of ``diet.config.GROUPS``, in that order (the order in which files
list the groups' widths). A new group is one subclass here plus its name in ``diet.config.GROUPS`` (and, where
they apply, in ``RECOVERABLE_GROUPS`` and ``diet.refit.REFIT_GROUPS``: docs/extending.md).

The slicing primitives the groups compose live in ``diet.slicing``; this module depends on torch, ``diet.config``
and ``diet.slicing`` alone, so every other module can import it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from diet.config import GROUPS as GROUP_NAMES
from diet.config import RECOVERABLE_GROUPS
from diet.slicing import Slice, scale_linear, slice_linear, slice_norm, squared

if TYPE_CHECKING:
    from diet.adapters.base import ModelAdapter


# -- the interface -------------------------------------------------------------------------------------------------
class DimensionGroup(ABC):
    """The rules of one dimension group; stateless, every method takes the model's adapter.

    A group declares its ``widths`` and, per mask row, its ``slices``: the rows or columns of each projection
    that every dimension owns (``diet.slicing.Slice``), the output projection's columns last. Cost, cutting,
    zeroing, magnitudes and the output projection's channels follow from that list; a group whose dimensions
    own more than projections (``hidden``: the embedding, the norms) adds what they own by overriding.
    """

    name: ClassVar[str]
    #: stock config width field -> per-layer list field of the ``diet_<family>`` configs (``diet.modeling``)
    per_layer_fields: ClassVar[dict[str, str]]
    #: the per-layer list field that counts this group's dimensions
    dimension_field: ClassVar[str]

    @abstractmethod
    def widths(self, adapter: ModelAdapter) -> list[int]:
        """Number of prunable dimensions in each layer."""

    @abstractmethod
    def slices(self, adapter: ModelAdapter, layer: int) -> list[Slice]:
        """What each dimension of mask row ``layer`` owns in each projection, the output projection last."""

    @abstractmethod
    def config_widths(self, adapter: ModelAdapter, kept: Sequence[torch.Tensor] | None = None
                      ) -> dict[str, list[int]]:
        """Per-layer values of the config fields of ``per_layer_fields``: read from the weights, or (with
        ``kept``, one LongTensor per layer) those that keeping ``kept`` would give."""

    @abstractmethod
    def weight_norms(self, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        """L2 norm of each dimension's output-projection columns, (W,) float64."""

    # -- derived from the slices -------------------------------------------------------------------------------------
    def cost(self, adapter: ModelAdapter, layer: int) -> int:
        """Parameters removed with one dimension of ``layer`` (weights and biases)."""
        return sum(s.cost() for s in self.slices(adapter, layer))

    def projections(self, adapter: ModelAdapter, layer: int) -> list[nn.Linear]:
        """Every projection the group's dimensions own rows or columns of, the output projection last."""
        return [s.linear for s in self.slices(adapter, layer)]

    def output_projection(self, adapter: ModelAdapter, layer: int) -> nn.Linear:
        """The projection whose *input* is the activation feeding the dimensions (hook target, output bias)."""
        return self.projections(adapter, layer)[-1]

    def output_channels(self, adapter: ModelAdapter, layer: int, dims: torch.Tensor) -> torch.Tensor:
        """Input columns of the output projection that belong to dimensions ``dims`` of ``layer`` (LongTensor)."""
        return self.slices(adapter, layer)[-1].indices(dims)

    def channel_blocks(self, adapter: ModelAdapter, layer: int) -> int | None:
        """None when each channel of the activation is one dimension; else the number of dimensions, each
        owning an equal block of contiguous channels (scores and baselines reduce over a block)."""
        return None if self.slices(adapter, layer)[-1].block == 1 else self.widths(adapter)[layer]

    def slice(self, adapter: ModelAdapter, layer: int, kept: torch.Tensor) -> None:
        """Remove every dimension of ``layer`` not in ``kept`` (sorted LongTensor) from the weights."""
        for s in self.slices(adapter, layer):  # all declared before any is cut: the blocks read today's shapes
            s.keep(kept)

    def magnitude(self, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        """L2 norm of all weights (and biases) each dimension owns, (W,) float32: the columns first, then the
        rows with their bias entries, each slice in declared order."""
        slices = self.slices(adapter, layer)
        total = torch.zeros(self.widths(adapter)[layer], device=slices[0].linear.weight.device)
        for s in [*(s for s in slices if s.axis == "in"), *(s for s in slices if s.axis == "out")]:
            total = s.add_squared_norms(total)
        return total.sqrt()

    @torch.no_grad()
    def zero(self, adapter: ModelAdapter, row: int, removed: torch.Tensor) -> None:
        """Make the dimensions ``removed`` of ``row`` contribute nothing, keeping every shape (the dense
        reference that a pruned model must equal): here, zero their output-projection columns."""
        self.slices(adapter, row)[-1].zero(removed)

    def residual_entries(self, adapter: ModelAdapter, layer: int) -> int:
        """Weights of one dimension of ``layer`` that lie on one residual channel: one per row or column it owns
        in each projection (each such weight is also a weight of that residual channel, see ``crossing``)."""
        return sum(s.residual_entries() for s in self.slices(adapter, layer))

    # -- per-layer configs ---------------------------------------------------------------------------------------------
    def unprunable_reason(self, widths: Sequence[int]) -> str | None:
        """Why no dimension of a model whose layers have ``widths`` can ever be removed (None when some can)."""
        if all(w <= 1 for w in widths):
            return f"every layer has a single {self.name} dimension, and a layer is never emptied"
        return None

    def per_layer_keep(self, config) -> list[torch.Tensor] | None:
        """Kept indices ``arange(width)`` per layer from a per-layer config's lists (None: the config has none):
        shapes a freshly built per-layer model whose layers are all built at the widest width."""
        widths = getattr(config, self.dimension_field, None)
        return None if widths is None else [torch.arange(w) for w in widths]

    def per_layer_config_problem(self, config) -> str | None:
        """What is wrong with a per-layer config's lists for this group beyond their lengths and ranges
        (checked by ``diet.modeling``), or None."""
        return None

    # -- activations, baselines, budget: defaults for a group with one output projection per layer ------------------
    @property
    def recoverable(self) -> bool:
        """Whether ``prune.recover: bias`` can hold removed dimensions at their means (``RECOVERABLE_GROUPS``)."""
        return self.name in RECOVERABLE_GROUPS

    def activation_sites(self, adapter: ModelAdapter, row: int) -> list[nn.Module]:
        """The modules whose input is the activation of mask row ``row`` (scoring hooks their inputs; one
        statistic per row sums over them all)."""
        return [self.output_projection(adapter, row)]

    def activation_width(self, adapter: ModelAdapter, row: int) -> int:
        """Channels of the activation of mask row ``row``."""
        return self.output_projection(adapter, row).in_features

    def reader_weights(self, adapter: ModelAdapter, row: int) -> list[torch.Tensor]:
        """Weights (out, D) whose input columns are the activation's channels (``wanda_sp``, ``flap``)."""
        return [self.output_projection(adapter, row).weight]

    def crossing(self, adapter: ModelAdapter, other: DimensionGroup) -> list[int] | None:
        """Parameters that one dimension of this group shares with one dimension of ``other`` in each of
        ``other``'s rows (removed with either), or None when the two groups own no parameter in common."""
        return None


class MlpGroup(DimensionGroup):
    """Intermediate channels of each layer's MLP (module doc)."""

    name = "mlp"
    per_layer_fields = {"intermediate_size": "intermediate_sizes"}
    dimension_field = "intermediate_sizes"

    def widths(self, adapter):
        return [adapter.mlp_projections(i)[1].in_features for i in range(adapter.num_layers)]

    def slices(self, adapter, layer):
        ins, down = adapter.mlp_projections(layer)
        return [*(Slice(lin, "out") for lin in ins), Slice(down, "in")]

    def config_widths(self, adapter, kept=None):
        return {"intermediate_size": self.widths(adapter) if kept is None else [len(k) for k in kept]}

    def weight_norms(self, adapter, layer):
        w = adapter.mlp_projections(layer)[1].weight.detach().double()   # (H, I)
        return w.norm(dim=0)                                              # (I,)


class AttentionGroup(DimensionGroup):
    """KV groups of each layer's attention, with the query heads that share them (module doc).

    With head_dim ``d`` and ``r`` query heads per KV group, group ``g`` owns k/v rows [g*d, (g+1)*d) and query
    heads [g*r, (g+1)*r), i.e. q rows (and o columns) [g*r*d, (g+1)*r*d): repeat_kv expands KV head ``g`` to the
    ``r`` consecutive query heads.
    """

    name = "attention"
    per_layer_fields = {"num_attention_heads": "num_heads_per_layer", "num_key_value_heads": "num_kv_heads_per_layer"}
    dimension_field = "num_kv_heads_per_layer"

    def widths(self, adapter):
        return [adapter.num_kv_heads(i) for i in range(adapter.num_layers)]

    def slices(self, adapter, layer):
        q, k, v, o = adapter.attention_projections(layer)
        d, r = adapter.head_dim(), adapter.heads_per_group(layer)
        return [Slice(q, "out", r * d), Slice(k, "out", d), Slice(v, "out", d), Slice(o, "in", r * d)]

    def config_widths(self, adapter, kept=None):
        n = range(adapter.num_layers)
        if kept is None:
            return {"num_attention_heads": [adapter.num_heads(i) for i in n],
                    "num_key_value_heads": [adapter.num_kv_heads(i) for i in n]}
        return {"num_attention_heads": [len(k) * adapter.heads_per_group(i) for i, k in enumerate(kept)],
                "num_key_value_heads": [len(k) for k in kept]}

    def weight_norms(self, adapter, layer):
        w = adapter.attention_projections(layer)[3].weight.detach().double()  # (H, n_heads * hd)
        w = w.view(w.shape[0], adapter.num_kv_heads(layer), -1)            # (H, G, hpg * hd)
        return w.square().sum(dim=(0, 2)).sqrt()                           # (G,)

    def per_layer_config_problem(self, config):
        heads, kv = config.num_heads_per_layer, config.num_kv_heads_per_layer
        if heads is not None and kv is not None:
            per_group = config.num_attention_heads // config.num_key_value_heads  # removing KV groups keeps it
            if any(h != k * per_group for h, k in zip(heads, kv)):
                return f"every layer needs {per_group} query heads per KV head"
        return None

    def unprunable_reason(self, widths):
        if all(w <= 1 for w in widths):
            return ("every layer has a single KV head (multi-query attention), so removing a KV group would "
                    "empty the layer's attention")
        return None


class HiddenGroup(DimensionGroup):
    """Residual-stream channels, one mask shared by every layer (module doc).

    **Exactness.** In the dense model with channels ``R`` zeroed (embedding columns and the writers' rows), the
    residual ``x`` is zero on ``R`` everywhere, and an RMSNorm over all ``H`` channels divides by
    ``sqrt(S / H + eps)``, ``S`` the sum of squares of the ``k`` kept channels. Over the ``k`` kept channels
    alone it would divide by ``sqrt(S / k + eps)``. Pruning therefore runs the residual stream scaled by
    ``a = sqrt(k / H)``: then every norm reading it sees ``a^2 S / k + eps = S / H + eps``, the dense
    denominator exactly, with ``eps`` unchanged (it is shared with Gemma-3's q_norm / k_norm, which act on
    head_dim and must not change). The scale is set and undone in the weights:

    * the stream starts scaled: embedding columns times ``a`` (Llama, Qwen2); Gemma multiplies the embedding by
      ``sqrt(hidden_size)`` from the config, and ``sqrt(k) = a * sqrt(H)``, so its embedding stays as it is
      (``ModelAdapter.embed_scale_exponent``);
    * every writer's rows (o_proj, down_proj, with their biases) times ``a``, so each branch adds ``a`` times
      its dense output; Gemma's post-branch norms see their input scaled by ``a`` too, hence the dense
      denominator, and keep their gain;
    * every norm reading the residual (the pre-norms) has its gain divided by ``a``, so its output is the dense
      one; the final norm also divides by the head's factor (a head tied to a scaled embedding is scaled with
      it), so the logits are the dense logits.

    Gains are ``weight`` (Llama, Qwen2) or ``1 + weight`` (Gemma, ``ModelAdapter.norm_offset``). Exact in real
    arithmetic; in floating point the logits agree to rounding (tested at float32 tolerance).
    """

    name = "hidden"
    per_layer_fields: ClassVar[dict[str, str]] = {}  # one width for the whole model: config.hidden_size
    dimension_field = None

    def widths(self, adapter):
        return [adapter.hidden_size()]

    @staticmethod
    def _readers(adapter, layer: int) -> list[nn.Linear]:
        """Projections whose input is the (normalised) residual: q, k, v and the MLP's input projections."""
        q, k, v, _ = adapter.attention_projections(layer)
        return [q, k, v, *adapter.mlp_projections(layer)[0]]

    @staticmethod
    def _writers(adapter, layer: int) -> list[nn.Linear]:
        """Projections whose output goes into the residual (through a post-branch norm in Gemma)."""
        return [adapter.attention_projections(layer)[3], adapter.mlp_projections(layer)[1]]

    @staticmethod
    def _layer_norms(adapter, layer: int) -> list[nn.Module]:
        return [*adapter.residual_norms(layer), *adapter.branch_norms(layer)]

    def slices(self, adapter, row):
        """In every layer, a column of each reader and a row (with its bias entry) of each writer."""
        return [s for i in range(adapter.num_layers)
                for s in (*(Slice(p, "in") for p in self._readers(adapter, i)),
                          *(Slice(p, "out") for p in self._writers(adapter, i)))]

    def cost(self, adapter, row):
        """Decoder-layer parameters of one residual channel: its slices, and an entry of each hidden-wide norm
        of every layer. The embedding, the head and the final norm also lose an entry each, outside the decoder
        layers (not counted in sparsity)."""
        return super().cost(adapter, row) + sum(len(self._layer_norms(adapter, i)) for i in range(adapter.num_layers))

    def output_projection(self, adapter, row):
        raise ValueError("the hidden group has no output projection: the residual stream feeds every layer")

    def output_channels(self, adapter, row, dims):
        return dims.to(torch.long)

    def activation_sites(self, adapter, row):
        """The residual stream entering each norm that reads it: each layer's pre-norms and the final norm."""
        return [*(n for i in range(adapter.num_layers) for n in adapter.residual_norms(i)), adapter.final_norm()]

    def activation_width(self, adapter, row):
        return adapter.hidden_size()

    def reader_weights(self, adapter, row):
        return [p.weight for i in range(adapter.num_layers) for p in self._readers(adapter, i)]

    def crossing(self, adapter, other):
        if other.name == self.name:
            return None
        return [other.residual_entries(adapter, layer) for layer in range(len(other.widths(adapter)))]

    def residual_entries(self, adapter, layer):
        raise ValueError("the hidden group is the residual stream itself")

    @torch.no_grad()
    def zero(self, adapter, row, removed):
        """Zero the removed channels where the residual stream is written: the embedding's columns and each
        writer's rows (and bias entries). The stream is then zero there in every layer."""
        removed = removed.to(torch.long)
        emb = adapter.model.get_input_embeddings()
        emb.weight[:, removed.to(emb.weight.device)] = 0.0                       # (V, removed)
        for s in self.slices(adapter, row):
            if s.axis == "out":
                s.zero(removed)

    @torch.no_grad()
    def slice(self, adapter, row, kept):
        model = adapter.model
        kept = kept.to(torch.long)
        width, k = adapter.hidden_size(), kept.numel()
        a = math.sqrt(k / width)                                                  # the residual's scale
        emb_factor = (k / width) ** (0.5 - adapter.embed_scale_exponent)          # a / (embed-scale ratio)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        w = emb.weight                                                            # (V, H)
        cols = w.detach().index_select(1, kept.to(w.device))                      # (V, k)
        if emb_factor != 1.0:
            cols = (cols.double() * emb_factor).to(w.dtype)
        emb.weight = nn.Parameter(cols, requires_grad=w.requires_grad)
        emb.embedding_dim = k
        if head is not None:
            if tied:
                head.weight = emb.weight
                head.in_features = k
            else:
                slice_linear(head, kept, "in")
        head_factor = emb_factor if tied else 1.0
        offset = adapter.norm_offset
        for s in self.slices(adapter, row):
            s.keep(kept)
            if s.axis == "out":
                scale_linear(s.linear, a)
        for i in range(adapter.num_layers):
            for norm in adapter.residual_norms(i):
                slice_norm(norm, kept, 1.0 / a, offset)
            for norm in adapter.branch_norms(i):
                slice_norm(norm, kept)
        slice_norm(adapter.final_norm(), kept, 1.0 / (a * head_factor), offset)

    def config_widths(self, adapter, kept=None):
        return {"hidden_size": self.widths(adapter) if kept is None else [len(k) for k in kept]}

    def weight_norms(self, adapter, row):
        """L2 norm of each channel's columns in every projection reading the residual, (H,) float64."""
        total = sum(p.detach().double().square().sum(dim=0) for p in self.reader_weights(adapter, row))  # (H,)
        return total.sqrt()

    def magnitude(self, adapter, row):
        """L2 norm of every weight of the channel: embedding (and untied head) column, reader columns, writer
        rows and bias entries, norm entries (the final norm's included), (H,) float32."""
        model = adapter.model
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        total = emb.weight.detach().float().square().sum(dim=0)                  # (H,)
        if head is not None and head.weight is not emb.weight:
            total = total + squared(head, "in")
        for s in self.slices(adapter, row):  # per layer: the readers' columns, then the writers' rows and biases
            total = s.add_squared_norms(total)
        for norm in (*(n for i in range(adapter.num_layers) for n in self._layer_norms(adapter, i)),
                     adapter.final_norm()):
            total = total + norm.weight.detach().float().square()
        return total.sqrt()

    def per_layer_keep(self, config):
        return None  # a per-layer model is built at the pruned hidden_size: nothing to slice


#: name -> group, in the order of ``diet.config.GROUPS``
GROUPS: dict[str, DimensionGroup] = {g.name: g for g in (MlpGroup(), AttentionGroup(), HiddenGroup())}
assert tuple(GROUPS) == GROUP_NAMES, "diet.config.GROUPS and diet.groups.GROUPS must list the same groups"

#: every stock config width field that differs per layer -> its per-layer list field (``hidden_size`` is one
#: width for the whole model: it has none)
PER_LAYER_FIELDS: dict[str, str] = {field: per_layer for group in GROUPS.values()
                                    for field, per_layer in group.per_layer_fields.items()}


def get_group(name: str) -> DimensionGroup:
    """The group called ``name``; ValueError otherwise (a programming error: user input naming groups is
    refused earlier, by ``diet.config`` and the mask and keep-set checks, with a DietError)."""
    try:
        return GROUPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown group {name!r}; known: {', '.join(GROUPS)}") from None
