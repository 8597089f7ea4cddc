"""Per-task importance of every prunable dimension, from calibration activations.

The score of a dimension is a statistic of the activation that feeds its weights, over the non-padding
tokens of one task's calibration texts:

* ``mlp``: channel ``j`` of the input of down_proj, shape (B, T, I).
* ``attention``: the input of o_proj, shape (B, T, n_heads * head_dim), reduced to one value per KV group
  (the group's ``heads_per_group`` query heads times ``head_dim`` channels).
* ``hidden``: the residual stream entering each norm that reads it (every layer's pre-norms and the final
  norm), shape (B, T, H); every site feeds the same sums, so the statistic is taken over all of them and all
  tokens: one row of H scores (a (1, H) tensor, the one-row mask of the group).

Statistics (running float64 sums, memory O(dimensions), never O(tokens); rounded to float32 once, at the
end). Batches run several at once, each with single-threaded kernels, and their sums are added in batch order
(``diet.parallel``), so a score file is the same bytes at any thread count on one kind of CPU:

* ``mean_abs``: mean of ``|a|`` over tokens. A KV group takes the mean over its channels.
* ``l2``: L2 norm over tokens, ``sqrt(sum a^2)``. A KV group takes ``sqrt(mean over its channels of
  sum a^2)``, so a group of one channel equals that channel's norm.

With ``weight_norm`` the score is multiplied by the L2 norm of the dimension's output-projection columns
(down_proj column ``j``; the o_proj columns of the KV group; for ``hidden``, the channel's columns in every
q/k/v/gate/up projection), as in Wanda's ``|W| * ||X||``.

Moments: whatever the statistic, the same pass keeps, per *channel* of each hooked activation, the sum and the
sum of squares of the signed activation (float64), and gives

* ``{group}.mean``: mean of ``a`` over tokens, (L, D) float32;
* ``{group}.var``: population variance of ``a`` over tokens, ``mean(a^2) - mean(a)^2``, (L, D) float32;

with ``D`` the activation's width: ``I`` for ``mlp``, ``n_heads * head_dim`` for ``attention`` (channels,
not KV groups: recovery and the FLAP / Wanda-sp baselines need them per o_proj column). ``split_scores``
separates them from the group scores.

Score files: ``scores/{task}.safetensors`` holds one float32 (L, W) tensor per group plus the group's two
moment tensors (``hidden``: (1, H) and (1, H), one row for all layers); the metadata sits in its header and beside it as ``scores/{task}.json``. Both are
byte-identical for identical inputs, at any thread count. ``read_scores`` returns the group scores only, ``read_moments`` the
moments.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Iterator, Sequence

import torch
from torch import nn

from diet.batching import by_length, pad_right
from diet.config import STATISTICS, ScoreConfig
from diet.errors import DataError, ModelError
from diet.groups import get_group
from diet.parallel import map_batches, one_kernel_thread
from diet.scorefile import MOMENTS, moment_name

class ActivationStats:
    """Running per-channel sums of one activation over non-padding tokens."""

    def __init__(self, width: int, statistic: str = "mean_abs"):
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
        self.width = width
        self.statistic = statistic
        self.sum: torch.Tensor | None = None  # (D,) float64, on the activations' device: of |a| or a^2
        self.sum_signed: torch.Tensor | None = None  # (D,) float64: of a
        self.sum_sq: torch.Tensor | None = None      # (D,) float64: of a^2
        self.n_tokens = 0

    def batch_sums(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
        """This batch's (sum, signed sum, sum of squares, tokens) of activations ``x`` (B, T, D); ``mask``
        (B, T) is True on real tokens (None: all count). Pure: nothing is added (``add_sums``)."""
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"expected activations (B, T, {self.width}), got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match activations {tuple(x.shape)}")
        x = x.detach()[mask.to(x.device)].double()               # (N, D): the real tokens only, out of place
        val = x.abs() if self.statistic == "mean_abs" else x.square()  # (N, D)
        batch_sum = val.sum(dim=0)                               # (D,) float64: exact to far below float32
        signed = x.sum(dim=0)                                    # (D,) float64
        sq = batch_sum if self.statistic == "l2" else x.square().sum(dim=0)  # (D,) float64
        return batch_sum, signed, sq, int(mask.sum())

    def add_sums(self, sums: tuple) -> None:
        """Add one batch's ``batch_sums``; batches added in the same order give the same bytes."""
        batch_sum, signed, sq, n = sums
        if self.sum is None:
            self.sum, self.sum_signed, self.sum_sq = batch_sum, signed, sq
        else:
            self.sum, self.sum_signed, self.sum_sq = self.sum + batch_sum, self.sum_signed + signed, self.sum_sq + sq
        self.n_tokens += n

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add activations ``x`` (B, T, D); ``mask`` (B, T) is True on real tokens (None: all count)."""
        self.add_sums(self.batch_sums(x, mask))

    def _check_filled(self) -> None:
        if self.sum is None or self.n_tokens == 0:
            raise DataError("no non-padding token reached this activation",
                            "check that the calibration texts are not empty and the attention mask is set")

    def finalize(self, n_groups: int | None = None) -> torch.Tensor:
        """Score per channel (D,), or per group of ``D // n_groups`` contiguous channels (n_groups,)."""
        self._check_filled()
        total = self.sum.cpu()                                   # (D,) float64
        if n_groups is not None:
            if self.width % n_groups:
                raise ValueError(f"width {self.width} does not split into {n_groups} groups")
            total = total.view(n_groups, self.width // n_groups).mean(dim=1)  # (G,)
        score = total / self.n_tokens if self.statistic == "mean_abs" else total.sqrt()
        return score.float()                                     # the one rounding to float32

    def moments(self) -> dict[str, torch.Tensor]:
        """Per-channel ``{"mean": (D,), "var": (D,)}`` of the signed activation over tokens, float32."""
        self._check_filled()
        mean = self.sum_signed.cpu() / self.n_tokens             # (D,) float64
        var = (self.sum_sq.cpu() / self.n_tokens - mean.square()).clamp_min(0.0)  # (D,) float64, population
        return {"mean": mean.float(), "var": var.float()}        # the one rounding to float32


class ActivationRecorder:
    """What ``record_activations`` yields: the stats per group and layer, and the current batch's mask.

    ``mask`` is per thread. Inside ``batch(mask)`` the hooks of this thread collect the batch's sums apart
    (``batch`` yields the list; ``fold`` adds it), so batches running in several threads never touch shared
    sums; outside it they add to the stats directly.
    """

    def __init__(self, stats: dict[str, list[ActivationStats]]):
        self.stats = stats
        self._local = threading.local()

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, T) bool of the batch this thread runs, set before each forward."""
        return getattr(self._local, "mask", None)

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._local.mask = value

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor) -> Iterator[list]:
        """Collect one batch's sums in this thread: yields [(stats, sums), ...] in the order the hooks ran."""
        self._local.mask, self._local.pending = mask, []
        try:
            yield self._local.pending
        finally:
            self._local.mask = self._local.pending = None

    def add(self, stats: ActivationStats, x: torch.Tensor) -> None:
        sums = stats.batch_sums(x, self.mask)
        pending = getattr(self._local, "pending", None)
        if pending is None:
            stats.add_sums(sums)
        else:
            pending.append((stats, sums))

    @staticmethod
    def fold(pending: list) -> None:
        """Add a batch's collected sums to the stats, in the order they were collected."""
        for stats, sums in pending:
            stats.add_sums(sums)


@contextlib.contextmanager
def record_activations(model: nn.Module, adapter, groups: Sequence[str],
                       statistic: str = "mean_abs") -> Iterator[ActivationRecorder]:
    """Hook the input of each group's activation sites (``DimensionGroup.activation_sites``: the output projection
    of each layer; for ``hidden`` every norm reading the residual, all feeding one statistic); hooks are always
    removed."""
    recorder = ActivationRecorder({})
    handles = []
    try:
        for group in groups:
            rule = get_group(group)
            recorder.stats[group] = []
            for row in range(len(rule.widths(adapter))):
                stats = ActivationStats(rule.activation_width(adapter, row), statistic)
                recorder.stats[group].append(stats)
                for module in rule.activation_sites(adapter, row):
                    handles.append(module.register_forward_pre_hook(_make_hook(stats, recorder), with_kwargs=True))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(stats: ActivationStats, recorder: ActivationRecorder):
    def hook(module, args, kwargs):
        x = args[0] if args else next(kwargs[k] for k in ("input", "hidden_states", "x") if k in kwargs)  # (B, T, D)
        recorder.add(stats, x)

    return hook


def encode_texts(tokenizer, texts: Sequence[str], *, max_length: int, add_bos: bool) -> list[list[int]]:
    """Token ids per text: no special tokens except an optional leading BOS, truncated to ``max_length``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ModelError("add_bos is set but the tokenizer has no BOS token",
                         "use a tokenizer with a bos_token, or score without add_bos")
    encoded = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_bos:
            ids = [bos] + ids
        if not ids:
            raise DataError(f"calibration text #{i} is empty after tokenisation",
                            "drop empty samples when preparing the task data")
        encoded.append(ids[:max_length])
    return encoded


def output_weight_norms(adapter, group: str) -> torch.Tensor:
    """L2 norm of each dimension's output-projection columns, (L, W) float64 (summed in an order that no thread
    count changes the result of at float32 resolution)."""
    rule = get_group(group)
    rows = [rule.weight_norms(adapter, row) for row in range(len(rule.widths(adapter)))]  # each (W,)
    return _stack_layers(rows, group)


def _stack_layers(rows: list[torch.Tensor], group: str) -> torch.Tensor:
    widths = sorted({r.numel() for r in rows})
    if len(widths) != 1:
        raise ModelError(f"group '{group}' has different widths per layer ({widths}); scores need a dense model",
                         "score the base (unpruned) model")
    return torch.stack([r.cpu() for r in rows])  # (L, W); a spread model's layers live on several GPUs


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``float64`` or ``model``: the scoring precision ``precision`` (``score.precision``) means on ``device``.

    ``auto`` is ``model`` on every device: the model's own dtype already gives the same bytes at any thread
    count (``diet.parallel``), and float64 would double the time and the memory. An explicit ``float64`` is kept.
    """
    if precision == "auto":
        return "model"
    return precision


@contextlib.contextmanager
def forward_precision(model: nn.Module, precision: str) -> Iterator[None]:
    """Run the block with the model in float64 (``precision="float64"``), then restore its dtype exactly.

    ``"model"`` (and ``"auto"``) leave the model as it is. Float64 does not make scores more reproducible (the
    batches' single-threaded kernels do that: ``diet.parallel``); it takes the activations closer to exact
    arithmetic, for comparing precisions (benchmarks/precision.py), at twice the time and memory. Float32 and
    bfloat16 weights both go to float64 and back exactly.
    """
    param = next(model.parameters())
    dtype = param.dtype
    if resolve_precision(precision, param.device) == "model" or dtype == torch.float64:
        yield
        return
    model.to(torch.float64)
    try:
        yield
    finally:
        model.to(dtype)  # float32 -> float64 -> float32 is exact


def score_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, groups: Sequence[str], statistic: str,
                weight_norm: bool, batch_size: int, max_length: int, add_bos: bool, progress: bool = True,
                adapter=None, precision: str = "model") -> tuple[dict[str, torch.Tensor], dict]:
    """Score every dimension of ``groups`` on ``texts``: (tensors, {n_samples, n_tokens}).

    ``tensors`` holds ``{group: (L, W) float32}`` and each group's moments ``{group}.mean`` / ``{group}.var``
    (L, D) (module doc; ``split_scores`` separates them). Texts run longest first in batches of ``batch_size``,
    right-padded; padding is excluded from every statistic. The result is byte-identical for identical inputs at
    any thread count on one kind of CPU (``diet.parallel``); ``precision="float64"`` runs the forward in float64
    (``forward_precision``).
    """
    from tqdm.auto import tqdm

    if not texts:
        raise DataError("no calibration texts to score", "check the task's calibration split")
    if adapter is None:
        from diet.adapters import get_adapter

        adapter = get_adapter(model)
    encoded = encode_texts(tokenizer, texts, max_length=max_length, add_bos=add_bos)
    batches = by_length([len(e) for e in encoded], batch_size)  # longest first: peak memory early
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if t is not None), 0)
    device = next(model.parameters()).device
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the LM head's (B, T, vocab) output is not needed
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        with torch.no_grad(), forward_precision(model, precision), \
                record_activations(model, adapter, groups, statistic) as rec:

            def run(batch: list[int]) -> tuple[list, int]:
                ids, mask = pad_right([encoded[i] for i in batch], pad_id)  # (B, T)
                with rec.batch(mask.to(device)) as pending:
                    # No attention mask: with right padding and causal attention a real token never sees a
                    # pad, and rows of pads that a mask would leave with no key to attend to (a sliding window
                    # past the text's end) turn to NaN in float64, which reaches real tokens through 0 * NaN.
                    model(input_ids=ids.to(device), **extra)
                return pending, int(mask.sum())

            # batches run several at once, each single-threaded; their sums are added in batch order, so the
            # scores are the same bytes at any thread count (diet.parallel)
            done = map_batches(run, batches, device)
            for pending, n in tqdm(done, total=len(batches), desc="scoring", unit="batch", disable=not progress):
                rec.fold(pending)
                n_tokens += n
        with one_kernel_thread():         # the reductions below sum in one fixed order too
            scores = _finish(rec, groups, adapter, weight_norm)
    finally:
        model.train(was_training)
    return scores, {"n_samples": len(encoded), "n_tokens": n_tokens}


def _finish(rec: ActivationRecorder, groups: Sequence[str], adapter, weight_norm: bool) -> dict[str, torch.Tensor]:
    """Each group's (L, W) scores and (L, D) moments from the recorded sums (module doc)."""
    scores = {}
    for group in groups:
        rule = get_group(group)
        rows = [stats.finalize(rule.channel_blocks(adapter, layer)) for layer, stats in enumerate(rec.stats[group])]
        s = _stack_layers(rows, group)                                     # (L, W)
        if weight_norm:
            s = s.double() * output_weight_norms(adapter, group)           # (L, W)
        scores[group] = s.float().contiguous()
        per_layer = [stats.moments() for stats in rec.stats[group]]        # each {moment: (D,)}
        for moment in MOMENTS:
            scores[moment_name(group, moment)] = _stack_layers([m[moment] for m in per_layer], group)  # (L, D)
    return scores


def score(model, tokenizer, texts: Sequence[str], cfg: ScoreConfig = ScoreConfig(), *, max_length: int = 512,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-dimension importance of ``cfg.groups`` on ``texts``: (tensors, stats).

    ``tensors`` holds ``{group: (L, W) float32}`` and the per-channel moments ``{group}.mean`` / ``{group}.var``
    (L, D); ``split_scores`` separates them.
    """
    from diet.adapters import get_adapter
    from diet.tokens import resolve_add_bos

    adapter = get_adapter(model)
    return score_texts(model, tokenizer, list(texts), groups=cfg.groups, statistic=cfg.statistic,
                       weight_norm=cfg.weight_norm, batch_size=cfg.batch_size, max_length=max_length,
                       add_bos=resolve_add_bos(model, tokenizer), progress=progress, adapter=adapter,
                       precision=cfg.precision)
