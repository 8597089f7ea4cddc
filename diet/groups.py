"""Dimension groups: every rule of one kind of prunable dimension, in one object.

(Over 500 lines: the three groups sit side by side on purpose, so that what one group does differently from
another reads in one file; each class stays short.)

A *group* says what one dimension of a layer is, in terms any model family provides through its adapter
(``diet.adapters.base.ModelAdapter``: where the projections are, the head sizes). Scoring, merging, selection,
pruning and checkpoint writing ask a group, never test a group's name:

* ``widths``: dimensions per layer; ``cost``: parameters removed with one dimension of a layer (weights and
  biases);
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

The pruning primitives the groups compose (``slice_linear``, ``ensure_bias``) live here too, so that this
module depends on torch and ``diet.config`` alone, and every other module can import it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from diet.config import GROUPS as GROUP_NAMES
from diet.config import RECOVERABLE_GROUPS

if TYPE_CHECKING:
    from diet.adapters.base import ModelAdapter


# -- primitives ----------------------------------------------------------------------------------------------------
def slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: str) -> nn.Linear:
    """Keep only the output rows (``dim="out"``) or input columns (``dim="in"``) ``idx`` of ``linear``, in place.

    ``in_features`` / ``out_features`` follow the new weight; an output slice also slices the bias.
    Returns ``linear`` (the same module, so hooks and references stay valid).
    """
    w = linear.weight  # (out, in)
    idx = idx.to(device=w.device, dtype=torch.long)
    if dim == "out":
        linear.weight = nn.Parameter(w.detach().index_select(0, idx), requires_grad=w.requires_grad)  # (k, in)
        if linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.detach().index_select(0, idx), requires_grad=b.requires_grad)  # (k,)
        linear.out_features = idx.numel()
    elif dim == "in":
        linear.weight = nn.Parameter(w.detach().index_select(1, idx), requires_grad=w.requires_grad)  # (out, k)
        linear.in_features = idx.numel()
    else:
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    return linear


def ensure_bias(lin: nn.Linear) -> None:
    """Give ``lin`` a zero bias (out_features,) on its weight's device and dtype if it has none."""
    if lin.bias is None:
        w = lin.weight
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)


def _sq(lin: nn.Linear, dim: int) -> torch.Tensor:
    """Squared norms of the rows (``dim=1``) or columns (``dim=0``) of a Linear's weight, float32."""
    return lin.weight.detach().float().square().sum(dim=dim)


def _row_cost(lin: nn.Linear) -> int:
    """Parameters of one output row of ``lin``: its weights and its bias entry."""
    return lin.in_features + (1 if lin.bias is not None else 0)


# -- the interface -------------------------------------------------------------------------------------------------
class DimensionGroup(ABC):
    """The rules of one dimension group; stateless, every method takes the model's adapter."""

    name: ClassVar[str]
    #: stock config width field -> per-layer list field of the ``diet_<family>`` configs (``diet.modeling``)
    per_layer_fields: ClassVar[dict[str, str]]
    #: the per-layer list field that counts this group's dimensions
    dimension_field: ClassVar[str]

    @abstractmethod
    def widths(self, adapter: ModelAdapter) -> list[int]:
        """Number of prunable dimensions in each layer."""

    @abstractmethod
    def cost(self, adapter: ModelAdapter, layer: int) -> int:
        """Parameters removed with one dimension of ``layer`` (weights and biases)."""

    @abstractmethod
    def projections(self, adapter: ModelAdapter, layer: int) -> list[nn.Linear]:
        """Every projection the group's dimensions own rows or columns of, the output projection last."""

    def output_projection(self, adapter: ModelAdapter, layer: int) -> nn.Linear:
        """The projection whose *input* is the activation feeding the dimensions (hook target, output bias)."""
        return self.projections(adapter, layer)[-1]

    def channel_blocks(self, adapter: ModelAdapter, layer: int) -> int | None:
        """None when each channel of the activation is one dimension; else the number of dimensions, each
        owning an equal block of contiguous channels (scores and baselines reduce over a block)."""
        return None

    @abstractmethod
    def output_channels(self, adapter: ModelAdapter, layer: int, dims: torch.Tensor) -> torch.Tensor:
        """Input columns of the output projection that belong to dimensions ``dims`` of ``layer`` (LongTensor)."""

    @abstractmethod
    def slice(self, adapter: ModelAdapter, layer: int, kept: torch.Tensor) -> None:
        """Remove every dimension of ``layer`` not in ``kept`` (sorted LongTensor) from the weights."""

    @abstractmethod
    def config_widths(self, adapter: ModelAdapter, kept: Sequence[torch.Tensor] | None = None
                      ) -> dict[str, list[int]]:
        """Per-layer values of the config fields of ``per_layer_fields``: read from the weights, or (with
        ``kept``, one LongTensor per layer) those that keeping ``kept`` would give."""

    @abstractmethod
    def weight_norms(self, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        """L2 norm of each dimension's output-projection columns, (W,) float64."""

    @abstractmethod
    def magnitude(self, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        """L2 norm of all weights (and biases) each dimension owns, (W,) float32."""

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

    # -- activations, baselines, reference, budget: defaults for a group with one output projection per layer --
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

    @torch.no_grad()
    def zero(self, adapter: ModelAdapter, row: int, removed: torch.Tensor) -> None:
        """Make the dimensions ``removed`` of ``row`` contribute nothing, keeping every shape (the dense
        reference that a pruned model must equal): here, zero their output-projection columns."""
        out = self.output_projection(adapter, row)
        out.weight[:, self.output_channels(adapter, row, removed).to(out.weight.device)] = 0.0  # (H, removed)

    def residual_entries(self, adapter: ModelAdapter, layer: int) -> int:
        """Weights of one dimension of ``layer`` that lie on one residual channel: its share of the input
        projections' rows and of the output projection's columns (each such weight is also a weight of that
        residual channel, see ``crossing``)."""
        *ins, out = self.projections(adapter, layer)
        width = self.widths(adapter)[layer]
        return (sum(p.out_features for p in ins) + out.in_features) // width

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

    def cost(self, adapter, layer):
        ins, out = adapter.mlp_projections(layer)
        return sum(_row_cost(p) for p in ins) + out.out_features

    def projections(self, adapter, layer):
        ins, out = adapter.mlp_projections(layer)
        return [*ins, out]

    def output_channels(self, adapter, layer, dims):
        return dims.to(torch.long)

    def slice(self, adapter, layer, kept):
        ins, out = adapter.mlp_projections(layer)
        for lin in ins:
            slice_linear(lin, kept, "out")
        slice_linear(out, kept, "in")

    def config_widths(self, adapter, kept=None):
        return {"intermediate_size": self.widths(adapter) if kept is None else [len(k) for k in kept]}

    def weight_norms(self, adapter, layer):
        w = adapter.mlp_projections(layer)[1].weight.detach().double()   # (H, I)
        return w.norm(dim=0)                                              # (I,)

    def magnitude(self, adapter, layer):
        ins, down = adapter.mlp_projections(layer)
        total = _sq(down, 0)                                              # (I,)
        for lin in ins:
            total = total + _sq(lin, 1)                                   # (I,)
            if lin.bias is not None:
                total = total + lin.bias.detach().float().square()
        return total.sqrt()


class AttentionGroup(DimensionGroup):
    """KV groups of each layer's attention, with the query heads that share them (module doc)."""

    name = "attention"
    per_layer_fields = {"num_attention_heads": "num_heads_per_layer", "num_key_value_heads": "num_kv_heads_per_layer"}
    dimension_field = "num_kv_heads_per_layer"

    def widths(self, adapter):
        return [adapter.num_kv_heads(i) for i in range(adapter.num_layers)]

    def cost(self, adapter, layer):
        q, k, v, o = adapter.attention_projections(layer)
        hd, hpg = adapter.head_dim(), adapter.heads_per_group(layer)
        return hd * (hpg * _row_cost(q) + _row_cost(k) + _row_cost(v)) + hpg * hd * o.out_features

    def projections(self, adapter, layer):
        return list(adapter.attention_projections(layer))

    def channel_blocks(self, adapter, layer):
        return adapter.num_kv_heads(layer)

    def rows(self, adapter, layer: int, kv_groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight rows of ``kv_groups`` in ``layer``: ``q`` (rows of q_proj = columns of o_proj), ``kv`` (rows of k/v).

        With head_dim ``d`` and ``r`` query heads per KV group, group ``g`` owns k/v rows [g*d, (g+1)*d) and
        query heads [g*r, (g+1)*r), i.e. q rows [g*r*d, (g+1)*r*d): repeat_kv expands KV head ``g`` to the
        ``r`` consecutive query heads.
        """
        d, r = adapter.head_dim(), adapter.heads_per_group(layer)
        g = kv_groups.to(torch.long)[:, None]  # (G, 1)
        kv = (g * d + torch.arange(d)).flatten()  # (G*d,)
        q = (g * r * d + torch.arange(r * d)).flatten()  # (G*r*d,)
        return {"q": q, "kv": kv}

    def output_channels(self, adapter, layer, dims):
        return self.rows(adapter, layer, dims)["q"]

    def slice(self, adapter, layer, kept):
        rows = self.rows(adapter, layer, kept)  # computed before slicing changes the head counts
        q, k, v, o = adapter.attention_projections(layer)
        slice_linear(q, rows["q"], "out")
        slice_linear(k, rows["kv"], "out")
        slice_linear(v, rows["kv"], "out")
        slice_linear(o, rows["q"], "in")

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

    def magnitude(self, adapter, layer):
        q, k, v, o = adapter.attention_projections(layer)
        g = adapter.num_kv_heads(layer)
        total = _sq(o, 0).view(g, -1).sum(dim=1)                           # (G,)
        for lin in (q, k, v):  # rows: heads contiguous, a group's rows contiguous
            total = total + _sq(lin, 1).view(g, -1).sum(dim=1)             # (G,)
            if lin.bias is not None:
                total = total + lin.bias.detach().float().square().view(g, -1).sum(dim=1)
        return total.sqrt()

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


def _scale_rows(lin: nn.Linear, factor: float) -> None:
    """Multiply ``lin``'s weight and bias by ``factor`` (in float64, then back to their dtype), in place."""
    lin.weight = nn.Parameter((lin.weight.detach().double() * factor).to(lin.weight.dtype),
                              requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter((lin.bias.detach().double() * factor).to(lin.bias.dtype),
                                requires_grad=lin.bias.requires_grad)


def _slice_norm(norm: nn.Module, kept: torch.Tensor, factor: float = 1.0, offset: float = 0.0) -> None:
    """Keep entries ``kept`` of an RMSNorm's weight and multiply the norm's gain by ``factor``: the gain is
    ``offset + weight`` (Llama: offset 0; Gemma: ``1 + weight``), so ``weight' = (offset + weight) * factor -
    offset``, computed in float64."""
    w = norm.weight
    kept_w = w.detach().index_select(0, kept.to(device=w.device, dtype=torch.long)).double()  # (k,)
    if factor != 1.0:
        kept_w = (offset + kept_w) * factor - offset
    norm.weight = nn.Parameter(kept_w.to(w.dtype), requires_grad=w.requires_grad)


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

    def cost(self, adapter, row):
        """Decoder-layer parameters of one residual channel: in every layer, a column of each reader, a row
        (with its bias entry) of each writer, an entry of each hidden-wide norm. The embedding, the head and
        the final norm also lose an entry each, outside the decoder layers (not counted in sparsity)."""
        return sum(sum(p.out_features for p in self._readers(adapter, i))
                   + sum(_row_cost(p) for p in self._writers(adapter, i)) + len(self._layer_norms(adapter, i))
                   for i in range(adapter.num_layers))

    def projections(self, adapter, row):
        return [p for i in range(adapter.num_layers) for p in (*self._readers(adapter, i), *self._writers(adapter, i))]

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
        for i in range(adapter.num_layers):
            for lin in self._writers(adapter, i):
                lin.weight[removed.to(lin.weight.device)] = 0.0                  # (removed, in)
                if lin.bias is not None:
                    lin.bias[removed.to(lin.bias.device)] = 0.0

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
        for i in range(adapter.num_layers):
            for lin in self._readers(adapter, i):
                slice_linear(lin, kept, "in")
            for lin in self._writers(adapter, i):
                slice_linear(lin, kept, "out")
                _scale_rows(lin, a)
            for norm in adapter.residual_norms(i):
                _slice_norm(norm, kept, 1.0 / a, offset)
            for norm in adapter.branch_norms(i):
                _slice_norm(norm, kept)
        _slice_norm(adapter.final_norm(), kept, 1.0 / (a * head_factor), offset)

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
            total = total + _sq(head, 0)
        for i in range(adapter.num_layers):
            for lin in self._readers(adapter, i):
                total = total + _sq(lin, 0)
            for lin in self._writers(adapter, i):
                total = total + _sq(lin, 1)
                if lin.bias is not None:
                    total = total + lin.bias.detach().float().square()
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
