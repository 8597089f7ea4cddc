"""Refit of the kept weights after choosing what to remove (``prune.recover: refit`` / ``refit_bias``).

Removing dimensions changes the input of each group's *output projection* (``down_proj`` for ``mlp``,
``o_proj`` for ``attention``): its removed input channels are gone, and with sequential pruning its kept
channels differ too. The refit solves, per layer and output projection ``y = W x + b``, for the kept columns
``W'`` (and, with ``refit_bias``, a new bias ``b'``) that keep the projection's output on calibration tokens what
the dense model's was::

    min  sum_t w_t || W' a_t + b' - y_t ||^2 + lambda ||W' - W[:, K]||^2
    a_t: the kept channels of the projection's input in the model pruned so far (sequential calibration),
    y_t: the dense projection's output in the dense model,

solved in closed form: with ``A = [a; 1]``, ``H = sum w A A^T`` and ``C = sum w y A^T``,
``[W' b'] = (C + lambda [W[:, K] 0]) (H + lambda I)^-1``, ``lambda = damping * mean(diag H)`` over the channel
entries. The ridge term pulls toward the dense columns, not toward zero as OSSCAR's and Týr-the-Pruner's damping
does: a few thousand calibration tokens per task overfit a plain least-squares fit, and a large ``lambda`` then
falls back to the dense columns (docs/method.md). Layers are taken in order, attention before the MLP inside a
layer, and each one sees the outputs of the layers already refitted: errors do not compound unseen.

With residual channels removed (``hidden``) every projection reading the stream loses input columns: in each
layer the attention's input projections (one Gram matrix for q, k and v) and then the MLP's (gate, up) are
refitted the same way, each before its group's output projection, which is refitted on all its input channels
(or those its group keeps) for the residual rows kept (the others stay zero, as in ``HiddenGroup.zero``); an
untied head last. The MLP's input projections are kept only where the MLP's output comes closer to the dense one
with them (``CHECK_AT_OUTPUT``: their outputs meet in a product, and a smaller error of each is no bound
on the product's).

A refit never makes a projection worse on the calibration tokens than keeping its dense columns
(``recover: none``): the two errors are compared exactly (from ``H``, ``C`` and ``sum w ||y||^2``) and the
better one is kept. The report gives, per group and layer, the relative calibration error of both.

The model is refitted in place and stays *dense-shaped*: removed channels' columns are zeroed (the model then
computes what the pruned one will) and kept columns hold the refit; ``diet.pruning.apply_mask`` then slices.
Token weights ``w_t`` give each source (task) the share of the total that ``merge.weights`` gives it, whatever
its token count (``calibration_batches``). Sums run in float64, single-threaded kernels give the same bytes
at any thread count.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from diet.batching import by_length, pad_right
from diet.config import REFIT_GROUPS, check_refit_groups
from diet.errors import ConfigError, DataError, ModelError
from diet.lstsq import damped_solve, obs_keep
from diet.parallel import one_kernel_thread

log = logging.getLogger(__name__)

#: groups with an output projection per layer, in the order inside a layer (attention's output feeds the MLP)
OUTPUT_GROUPS = ("attention", "mlp")
#: with ``hidden`` pruned, the input projections refitted per group: the attention's q, k and v. The MLP's input
#: projections keep their dense columns: their outputs meet in a product (``act(gate) * up``), so a smaller
#: squared error of each can be a much larger error of the product (on SmolLM2 a refit of ``up_proj`` alone
#: raised held-out perplexity by orders of magnitude); the MLP's output projection makes up for them instead.
HIDDEN_READERS = {"attention": lambda adapter, layer: list(adapter.attention_projections(layer)[:3]),
                  "mlp": lambda adapter, layer: list(adapter.mlp_projections(layer)[0])}
#: readers whose refit is kept only where it lowers the error of the group's output projection's output (the
#: block's output), not only their own: outputs that meet in a product (``act(gate) * up``)
CHECK_AT_OUTPUT = ("mlp",)
#: groups whose kept channels the refit can choose itself (``prune.refit_choose: obs``); a KV group is a block
#: of channels, chosen by the mask
CHOOSE_GROUPS = ("mlp",)


@dataclass
class Batch:
    """Right-padded token ids (B, T), the real-token mask (B, T) and the weight of each real token."""

    ids: torch.Tensor
    mask: torch.Tensor
    weight: float


def calibration_batches(sources: Mapping[str, Sequence[Sequence[int]]], *, weights: Mapping[str, float] | None,
                        batch_size: int, pad_id: int) -> list[Batch]:
    """Batches of token-id sequences from ``sources`` (``{task: [ids, ...]}``), each batch of one source.

    Every real token of source ``s`` weighs ``weights[s] / (sum of weights * tokens of s)``: a source's share of
    the total is its weight's share (default weight 1: each task counts the same). Sources of weight 0 are left
    out; sources are taken in sorted order.
    """
    w = {s: float((weights or {}).get(s, 1.0)) for s in sorted(sources)}
    active = [s for s in w if w[s] > 0 and sources[s]]
    if not active:
        raise DataError("the refit has no calibration tokens: every source is empty or has weight 0",
                        "give at least one task a positive merge weight and calibration samples")
    total = sum(w[s] for s in active)
    batches = []
    for s in active:
        seqs = sources[s]
        tokens = sum(len(q) for q in seqs)
        for rows in by_length([len(q) for q in seqs], batch_size):
            ids, mask = pad_right([seqs[i] for i in rows], pad_id)
            batches.append(Batch(ids, mask, w[s] / (total * tokens)))
    return batches


class _Stop(Exception):
    """Raised by a hook to end a layer's forward once what it needs is captured."""


_local = threading.local()  # per worker thread: what a tap captured (batches run in threads: diet.parallel)


class _Tap:
    """While installed, a call of the ``modules`` in a thread that asked for it (``capture``) records each module's
    input (``want="input"``) or output (``"output"``) and stops that forward once every one was called; other
    calls pass through."""

    def __init__(self, modules: Sequence[nn.Module], want: str):
        self.modules = list(modules)
        if want == "input":
            self.handles = [m.register_forward_pre_hook(lambda mod, args, i=i: self._hit(i, args[0]))
                            for i, m in enumerate(self.modules)]
        else:
            self.handles = [m.register_forward_hook(lambda mod, args, out, i=i: self._hit(i, out))
                            for i, m in enumerate(self.modules)]

    def _hit(self, i: int, x: torch.Tensor) -> None:
        box = getattr(_local, "box", None)
        if box is not None:
            box[i] = x
            if len(box) == len(self.modules):
                raise _Stop

    def capture(self, fn) -> list[torch.Tensor]:
        """``fn()`` up to the last of the modules' calls: the captured tensors, each as (N, D)."""
        _local.box = {}
        try:
            fn()
        except _Stop:
            pass
        finally:
            box, _local.box = _local.box, None
        if len(box) != len(self.modules):
            missing = [type(m).__name__ for i, m in enumerate(self.modules) if i not in box]
            raise ModelError(f"the layer never called its {', '.join(missing)} projection",
                             "refit a model whose adapter names the projections its layers run")
        return [box[i].reshape(-1, box[i].shape[-1]) for i in range(len(self.modules))]

    def __enter__(self) -> "_Tap":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class _LayerRunner:
    """Calls one decoder layer with the arguments the model gave it (captured once per batch)."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[Batch], device):
        from diet.parallel import map_batches

        self.layers, self.device = layers, device

        def grab(module, args, kwargs):
            captured = _local.calls
            if not captured:
                captured.append(args[0] if args else kwargs["hidden_states"])
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            captured.append({"args": tuple(args[1:]), "kwargs": rest})
            if len(captured) == len(layers) + 1:
                raise _Stop

        def first_pass(batch: Batch) -> list:
            _local.calls = []
            try:
                model(input_ids=batch.ids.to(device), use_cache=False)
            except _Stop:
                pass
            finally:
                calls, _local.calls = _local.calls, None
            if len(calls) != len(layers) + 1:
                raise ModelError(f"the model called {max(len(calls) - 1, 0)} of its {len(layers)} decoder layers",
                                 "refit a causal LM whose forward runs every decoder layer once")
            return calls

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
        try:
            calls = list(map_batches(first_pass, batches, device))
        finally:
            for h in handles:
                h.remove()
        self.inputs: list[torch.Tensor] = [c[0].detach() for c in calls]   # per batch: the first layer's input
        self.kwargs: list[list[dict]] = [c[1:] for c in calls]              # per batch, per layer: the rest

    def __call__(self, layer: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        call = self.kwargs[batch][layer]
        out = self.layers[layer](hidden, *call["args"], **call["kwargs"])
        return out[0] if isinstance(out, tuple) else out

    def each(self, fn) -> list:
        """``fn(b)`` for every batch index, several at once (``diet.parallel.map_batches``), in batch order."""
        from diet.parallel import map_batches

        return list(map_batches(fn, range(len(self.kwargs)), self.device))


class _Weights:
    """A projection's dense weights beside its working ones: the refit in the kept columns, zero elsewhere, and
    zero in the rows ``kept_rows`` leaves out (a writer into a pruned residual stream; None: every row)."""

    def __init__(self, lin: nn.Linear, kept_cols: torch.Tensor, kept_rows: torch.Tensor | None = None):
        self.lin = lin
        self.dense_w = lin.weight.detach().clone()
        self.dense_b = None if lin.bias is None else lin.bias.detach().clone()
        self.kept = kept_cols.to(lin.weight.device)
        self.rows = (torch.arange(self.dense_w.shape[0]) if kept_rows is None else kept_rows).to(lin.weight.device)
        work = torch.zeros_like(self.dense_w)
        work[self.rows[:, None], self.kept] = self.dense_w[self.rows[:, None], self.kept]
        self.work_w, self.work_b = work, self.dense_b
        if self.dense_b is not None and kept_rows is not None:
            self.work_b = torch.zeros_like(self.dense_b)
            self.work_b[self.rows] = self.dense_b[self.rows]

    def use(self, which: str) -> None:
        dense = which == "dense"
        self.lin.weight.data = self.dense_w if dense else self.work_w
        if self.lin.bias is not None:
            b = self.dense_b if dense else self.work_b
            self.lin.bias.data = b if b is not None else torch.zeros_like(self.lin.bias)


@dataclass
class Refit:
    """What ``refit`` did: ``report`` ``{group: [{"layer", "error_none", "error_refit", "kept"}, ...]}`` (``kept``:
    ``refit``, ``obs`` or ``dense``, whichever left the least calibration error) and the kept dimensions
    ``keep`` to prune to (the mask's, or those ``obs_keep`` chose)."""

    report: dict[str, list[dict]]
    keep: dict[str, list[torch.Tensor]]

    def summary(self) -> dict[str, dict]:
        """Per group: the mean relative calibration error with the dense columns kept (``error_none``) and
        after the refit (``error_refit``, the better of the two per layer), the layers refitted, every row."""
        out = {}
        for group, rows in self.report.items():
            out[group] = {"error_none": sum(r["error_none"] for r in rows) / len(rows),
                          "error_refit": sum(min(r["error_none"], r["error_refit"]) for r in rows) / len(rows),
                          "layers_refitted": sum(r["kept"] != "dense" for r in rows), "layers": rows}
        return out


def refit_on_texts(model: nn.Module, tokenizer, texts: Mapping[str, Sequence[str]],
                   keep: Mapping[str, Sequence[torch.Tensor]], *, weights: Mapping[str, float] | None = None,
                   max_length: int = 512, batch_size: int = 8, damping: float = 0.3, bias: bool = False,
                   priors: Mapping[str, torch.Tensor] | None = None, progress: bool = True) -> tuple[Refit, dict]:
    """``refit`` on calibration ``texts`` by source (``{task: [text, ...]}``, weighted by ``weights``), tokenised as
    scoring does; returns (the refit, ``{"n_samples", "n_tokens"}``)."""
    from diet.scoring import encode_texts
    from diet.tokens import resolve_add_bos

    add_bos = resolve_add_bos(model, tokenizer)
    encoded = {s: encode_texts(tokenizer, t, max_length=max_length, add_bos=add_bos) for s, t in texts.items()}
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if t is not None), 0)
    batches = calibration_batches(encoded, weights=weights, batch_size=batch_size, pad_id=pad_id)
    stats = {"n_samples": sum(len(e) for e in encoded.values()), "n_tokens": sum(int(b.mask.sum()) for b in batches)}
    log.info("refit on %d samples (%d tokens) of %s", stats["n_samples"], stats["n_tokens"], ", ".join(texts))
    return refit(model, keep, batches, damping=damping, bias=bias, priors=priors, progress=progress), stats


@torch.no_grad()
def refit(model: nn.Module, keep: Mapping[str, Sequence[torch.Tensor]], batches: Sequence[Batch], *,
          damping: float = 0.3, bias: bool = False, priors: Mapping[str, torch.Tensor] | None = None,
          progress: bool = True) -> Refit:
    """Refit ``model`` (dense, in place) for the kept dimensions ``keep`` (module doc).

    ``keep`` is ``diet.pruning``'s ``{group: [kept dims per row]}`` (groups of ``REFIT_GROUPS``); ``bias`` also
    solves for the output projections' biases (created where absent: the caller makes the config carry them, as
    for ``prune.recover: bias``; the readers of a pruned residual stream keep theirs). ``priors`` (``{group: (L, W)
    merged priority}``, groups of ``CHOOSE_GROUPS``) lets the refit choose each layer's kept channels (as many as
    ``keep`` has) by ``obs_keep``. Call ``diet.pruning.apply_mask`` with the result's ``keep`` after it.
    """
    from tqdm.auto import tqdm

    from diet.adapters import get_adapter
    from diet.biases import ensure_output_biases
    from diet.keep import check_keep

    check_refit_groups(keep, "the mask's groups")
    if not isinstance(damping, (int, float)) or not damping >= 0 or damping != damping or damping == float("inf"):
        raise ConfigError(f"prune.refit_damping = {damping!r} must be a finite number >= 0", "use e.g. 0.3")
    if not batches:
        raise DataError("the refit has no calibration batches", "pass the tasks' calibration samples")
    adapter = get_adapter(model)
    keep = check_keep(adapter, dict(keep))
    priors = dict(priors or {})
    unchosen = [g for g in priors if g not in CHOOSE_GROUPS or g not in keep]
    if unchosen:
        raise ConfigError(f"the refit chooses the kept channels of {', '.join(CHOOSE_GROUPS)} only, and of pruned "
                          f"groups; it was asked to for {', '.join(unchosen)}",
                          "set prune.refit_choose: mask, or prune only the mlp group")
    layers = adapter.decoder_layers()
    device = next(model.parameters()).device
    if bias:
        ensure_output_biases(adapter, [g for g in OUTPUT_GROUPS if g in keep])
    names = {id(m): n for n, m in model.named_modules()}
    hidden = keep["hidden"][0] if "hidden" in keep else None
    was_training = model.training
    model.eval()
    report: dict[str, list[dict]] = {g: [] for g in REFIT_GROUPS if g in keep}
    try:
        run = _LayerRunner(model, layers, batches, device)
        dense_h, run.inputs = run.inputs, None      # the first layer's inputs, held once
        pruned_h = [h.clone() for h in dense_h]
        if hidden is not None:  # the embedding's removed columns are gone (diet.groups.HiddenGroup.zero)
            removed = _removed(hidden, adapter.hidden_size()).to(device)
            for h in pruned_h:
                h[..., removed] = 0.0
        for layer in tqdm(range(len(layers)), desc="refit", unit="layer", disable=not progress):
            work, units = _layer_units(adapter, layer, keep, priors, names, bias)
            for unit in units:
                forward = lambda b, h: run(layer, b, h)  # noqa: E731
                before = [(p.work_w, p.work_b, p.kept) for p in unit.projs]
                rows = _fit(unit, forward, run, work, batches, dense_h, pruned_h, damping)
                if unit.check is not None:
                    rows = _check_at(unit, before, rows, forward, run, work, batches, dense_h, pruned_h)
                report[unit.group].extend({"layer": layer, **r} for r in rows)
                if unit.prior is not None:  # CHOOSE_GROUPS: each channel is one dimension
                    keep[unit.group][layer] = unit.projs[0].kept.cpu()
            for p in work:
                p.use("dense")
            dense_h = run.each(lambda b: run(layer, b, dense_h[b]))
            for p in work:
                p.use("work")
            pruned_h = run.each(lambda b: run(layer, b, pruned_h[b]))
        if hidden is not None:
            report["hidden"].extend(_fit_head(model, adapter, hidden, names, run, batches, dense_h, pruned_h,
                                              damping, len(layers)))
    finally:
        model.train(was_training)
    for g, rows in report.items():
        before = sum(r["error_none"] for r in rows) / len(rows)
        after = sum(min(r["error_none"], r["error_refit"]) for r in rows) / len(rows)
        log.info("refit %s: mean relative calibration error %.4f -> %.4f (%d of %d %s refitted)", g, before,
                 after, sum(r["kept"] != "dense" for r in rows), len(rows),
                 "projections" if g == "hidden" else "layers")
    return Refit(report, keep)


def _removed(kept: torch.Tensor, width: int) -> torch.Tensor:
    """The indices of ``range(width)`` not in ``kept``."""
    out = torch.ones(width, dtype=torch.bool)
    out[kept.to(torch.long).cpu()] = False
    return out.nonzero().flatten()


@dataclass
class _Unit:
    """One solve: the projections that read one input (so one Gram matrix), reported under ``group``; ``names``
    (the modules' names) are reported for ``hidden``, whose solves are several per layer. ``bias``: solve for an
    intercept too; ``prior``: choose the kept channels (``obs_keep``); ``check``: keep the refit only where it
    lowers the error of this module's output (``_check_at``); ``from_inputs``: targets from the dense
    input and weights instead of captured outputs (the head: its outputs span the vocabulary)."""

    group: str
    names: list[str]
    projs: list[_Weights]
    bias: bool
    prior: torch.Tensor | None = None
    from_inputs: bool = False
    check: nn.Module | None = None


def _layer_units(adapter, layer: int, keep: Mapping[str, Sequence[torch.Tensor]], priors: Mapping[str, torch.Tensor],
                 names: Mapping[int, str], bias: bool) -> tuple[list[_Weights], list[_Unit]]:
    """The working weights of ``layer`` (every projection the refit solves for or zeroes) and its solves, in the
    order the layer runs them: with ``hidden``, the attention's input projections (q, k, v: their kept columns),
    the attention's output projection, the MLP's input projections, the MLP's output projection. With ``hidden``
    the output projections write only the kept residual channels (their other rows are zero)."""
    from diet.groups import GROUPS

    hidden = keep["hidden"][0] if "hidden" in keep else None
    work: list[_Weights] = []
    units: list[_Unit] = []
    for g in OUTPUT_GROUPS:  # attention before the MLP: its output feeds the MLP
        if hidden is not None and g in HIDDEN_READERS:
            readers = HIDDEN_READERS[g](adapter, layer)
            ws = [_Weights(lin, hidden) for lin in readers]
            work += ws
            check = GROUPS[g].output_projection(adapter, layer) if g in CHECK_AT_OUTPUT else None
            units.append(_Unit("hidden", [names[id(lin)] for lin in readers], ws, bias=False, check=check))
        if g not in keep and hidden is None:
            continue
        lin = GROUPS[g].output_projection(adapter, layer)
        cols = (GROUPS[g].output_channels(adapter, layer, keep[g][layer]) if g in keep
                else torch.arange(lin.in_features))
        w = _Weights(lin, cols, hidden)
        work.append(w)
        if g in keep:
            prior = priors[g][layer, :GROUPS[g].widths(adapter)[layer]] if g in priors else None
            units.append(_Unit(g, [names[id(lin)]], [w], bias, prior))
        else:  # the group keeps its channels, and its output projection makes up for the residual's loss
            units.append(_Unit("hidden", [names[id(lin)]], [w], bias=False))
    return work, units


def _fit_head(model, adapter, hidden: torch.Tensor, names: Mapping[int, str], run: _LayerRunner,
              batches: Sequence[Batch], dense_h: list[torch.Tensor], pruned_h: list[torch.Tensor], damping: float,
              layer: int) -> list[dict]:
    """Refit the kept columns of an untied output head on the final norm's outputs; a head tied to the embedding
    is left as it is (refitting it would untie it, adding a vocabulary-sized matrix)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        log.info("refit hidden: the output head is tied to the embedding and keeps its dense columns")
        return []
    norm = adapter.final_norm()
    w = _Weights(head, hidden)
    unit = _Unit("hidden", [names[id(head)]], [w], bias=False, from_inputs=True)
    rows = _fit(unit, lambda b, h: head(norm(h)), run, [w], batches, dense_h, pruned_h, damping)
    w.use("work")
    return [{"layer": layer, **r} for r in rows]


def _fit(unit: _Unit, forward, run: _LayerRunner, work: Sequence[_Weights], batches: Sequence[Batch],
         dense_h: list[torch.Tensor], pruned_h: list[torch.Tensor], damping: float) -> list[dict]:
    """Solve for ``unit``'s projections and install them in their working weights: ``forward(b, h)`` runs
    batch ``b`` from input ``h`` through them (the dense weights for the targets, the working ones for the
    inputs). With ``unit.prior`` (one priority per input channel) the kept channels are chosen by ``obs_keep``
    first. One report row per projection."""
    first = unit.projs[0]
    width = first.dense_w.shape[1]
    cols = torch.arange(width, device=first.kept.device) if unit.prior is not None else first.kept  # the Gram's
    k = cols.numel() + (1 if unit.bias else 0)
    dev = first.dense_w.device
    hess = torch.zeros(k, k, dtype=torch.float64, device=dev)                                   # sum w A A^T
    cross = [torch.zeros(p.rows.numel(), k, dtype=torch.float64, device=dev) for p in unit.projs]  # sum w y A^T
    yy = [0.0] * len(unit.projs)                                                                # sum w ||y||^2
    real = [batch.mask.reshape(-1).to(dev) for batch in batches]
    for q in work:
        q.use("dense")
    targets = ([first.lin], "input") if unit.from_inputs else ([p.lin for p in unit.projs], "output")
    with _Tap(*targets) as tap:
        ys = run.each(lambda b: [y[real[b]] for y in tap.capture(lambda: forward(b, dense_h[b]))])
    for q in work:
        q.use("work")
    with _Tap([first.lin], "input") as tap:
        xs = run.each(lambda b: tap.capture(lambda: forward(b, pruned_h[b]))[0][real[b]][:, cols])  # (N, K) each
    with one_kernel_thread():   # the sums, the choice and the solves: one kernel thread, in batch order
        for batch, captured, x in zip(batches, ys, xs):
            a = x.double()
            if unit.bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            hess += batch.weight * (a.T @ a)
            for i, p in enumerate(unit.projs):
                if unit.from_inputs:
                    y = captured[0].double() @ p.dense_w.double().T + _dense_bias(p)
                else:
                    y = captured[i].double()
                y = y[:, p.rows]
                if not unit.bias:  # the dense bias stays: the kept columns fit what it leaves
                    y = y - _dense_bias(p)[p.rows]
                cross[i] += batch.weight * (y.T @ a)
                yy[i] += batch.weight * float(y.square().sum())
        del ys, xs
        rows = [_choose(p, hess, c, e, unit.prior, damping, unit.bias) for p, c, e in zip(unit.projs, cross, yy)]
    if unit.group == "hidden":
        rows = [{"projection": name, **r} for name, r in zip(unit.names, rows)]
    return rows


def _check_at(unit: _Unit, before: list, rows: list[dict], forward, run: _LayerRunner, work: Sequence[_Weights],
              batches: Sequence[Batch], dense_h: list[torch.Tensor], pruned_h: list[torch.Tensor]) -> list[dict]:
    """Keep ``unit``'s refit only where the output of ``unit.check`` (on the calibration tokens, against the dense
    model's) is closer with it than with the projections' dense columns (``before``: their working weights
    before the refit); the rows say which was kept at that output (``output_error_none``, ``_refit``)."""
    real = [batch.mask.reshape(-1) for batch in batches]
    kept = unit.projs[0].kept   # the residual channels kept: the rows of the check's output that remain
    for q in work:
        q.use("dense")
    with _Tap([unit.check], "output") as tap:
        ys = run.each(lambda b: tap.capture(lambda: forward(b, dense_h[b]))[0][real[b].to(kept.device)][:, kept])

    def error() -> float:
        for q in work:
            q.use("work")
        with _Tap([unit.check], "output") as tap:
            outs = run.each(lambda b: tap.capture(lambda: forward(b, pruned_h[b]))[0][real[b].to(kept.device)]
                            [:, kept])
        with one_kernel_thread():
            return sum(batch.weight * float((o.double() - y.double()).square().sum())
                       for batch, o, y in zip(batches, outs, ys))

    refit_err = error()
    solved = [(p.work_w, p.work_b, p.kept) for p in unit.projs]
    for p, (w, b, k) in zip(unit.projs, before):
        p.work_w, p.work_b, p.kept = w, b, k
    none_err = error()
    with one_kernel_thread():
        scale = sum(batch.weight * float(y.double().square().sum()) for batch, y in zip(batches, ys)) or 1.0
    if refit_err < none_err:
        for p, (w, b, k) in zip(unit.projs, solved):
            p.work_w, p.work_b, p.kept = w, b, k
    for r in rows:
        r.update(output_error_none=none_err / scale, output_error_refit=refit_err / scale)
        if refit_err >= none_err:
            r["kept"] = "dense"
    return rows


def _choose(p: _Weights, hess: torch.Tensor, cross: torch.Tensor, yy: float, prior: torch.Tensor | None,
            damping: float, bias: bool) -> dict:
    """The best of keeping ``p``'s dense columns, their refit and (with ``prior``) the refit of the channels
    ``obs_keep`` chooses, by the calibration error the sums give; installed in ``p``'s working weights."""
    k = hess.shape[0]

    def restrict(kept: torch.Tensor) -> torch.Tensor:
        """Positions in the Gram of the channels ``kept`` (and of the intercept)."""
        pos = kept if prior is not None else torch.arange(kept.numel())
        return torch.cat([pos, torch.tensor([k - 1])]) if bias else pos

    def error(m: torch.Tensor, pos: torch.Tensor) -> float:  # sum w ||m A - y||^2, from the sums
        h, c = hess[pos][:, pos], cross[:, pos]
        return float(((m @ h) * m).sum() - 2 * (m * c).sum()) + yy

    # recover: none keeps the mask's dense columns (and the dense bias)
    dense_w = p.dense_w[p.rows]
    dense_cols = dense_w[:, p.kept].double()
    none = torch.cat([dense_cols, _dense_bias(p)[p.rows][:, None]], dim=1) if bias else dense_cols
    options = [("dense", p.kept, none, error(none, restrict(p.kept)))]
    choices = [p.kept] if prior is None else [p.kept, obs_keep(hess, cross, p.kept.numel(), prior, damping, bias)]
    for kept in choices:
        pos = restrict(kept)
        solved = damped_solve(hess[pos][:, pos], cross[:, pos], kept.numel(), damping, dense_w[:, kept].double())
        if bool(torch.isfinite(solved).all()):
            options.append(("refit" if kept is p.kept else "obs", kept, solved, error(solved, pos)))
    kind, kept, chosen, err = min(options, key=lambda o: (o[3], o[0] == "dense"))  # ties: the refit
    p.kept = kept
    w = torch.zeros_like(p.dense_w)
    w[p.rows[:, None], kept] = chosen[:, :kept.numel()].to(w.dtype)
    p.work_w = w
    if bias:
        b = torch.zeros(p.dense_w.shape[0], dtype=p.dense_w.dtype, device=p.dense_w.device)
        b[p.rows] = chosen[:, kept.numel()].to(b.dtype)
        p.work_b = b
    scale = yy if yy > 0 else 1.0
    refit_err = min((o[3] for o in options if o[0] != "dense"), default=options[0][3])
    row = {"error_none": max(options[0][3], 0.0) / scale, "error_refit": max(refit_err, 0.0) / scale, "kept": kind}
    if prior is not None:  # kept channels the mask did not keep
        row["channels_changed"] = int(kept.numel() - torch.isin(kept, options[0][1]).sum())
    return row


def _dense_bias(p: _Weights) -> torch.Tensor:
    """The dense bias of ``p``'s projection in float64 (zeros where it has none), (out,)."""
    if p.dense_b is None:
        return torch.zeros(p.dense_w.shape[0], dtype=torch.float64, device=p.dense_w.device)
    return p.dense_b.double()
