"""Direct multiple-choice log-likelihood scoring, without lm-eval.

It reproduces lm-evaluation-harness's ``multiple_choice`` scoring item by item:

* the context's trailing whitespace moves to the continuation; ``context + continuation`` is encoded whole
  and the continuation's tokens are what follows the separately encoded context;
* the model reads ``(context + continuation)[-(max_length + 1):][:-1]`` and the continuation's
  log-probabilities are summed::

      tokens   c0 c1 c2 c3 | x0 x1 x2          (context | continuation)
      input    c0 c1 c2 c3   x0 x1             (last token dropped)
      logits            ^^   ^^ ^^             predict x0 x1 x2
* ``acc`` = argmax of the summed log-likelihoods; ``acc_norm`` divides each by the character length of
  lm-eval's ``doc_to_choice`` entry: the choice text, or for partial-scoring tasks (WinoGrande) the
  choice's own context, which is what lm-eval's multiple-input form lists as choices.

When every choice shares one context, the context runs once: one-token choices (yes / no) are read off a
batched forward over many items' contexts; longer ones run on copies of the context's KV cache. Other items
(partial scoring) run each (context, continuation) as its own sequence, batched across items. The tests
check every path against lm-eval on the same items.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diet.batching import by_length, pad_right
from diet.errors import DataError
from diet.evaluation.data import EvalTask, load_eval_task
from diet.parallel import map_batches
from diet.tokens import resolve_add_bos

log = logging.getLogger("diet.evaluation")

Pair = tuple[list[int], list[int]]   # (context token ids, continuation token ids)


@dataclass(frozen=True)
class Item:
    """One multiple-choice question as (context, continuation) strings per choice."""

    id: str
    contexts: tuple[str, ...]        # (k,) one per choice; all equal unless partial scoring
    continuations: tuple[str, ...]   # (k,) target_delimiter + choice text
    label: int
    norm_chars: tuple[int, ...]      # (k,) characters that acc_norm divides by


def build_items(task: EvalTask) -> list[Item]:
    delim = task.delimiter
    items = []
    for row in task.rows:
        k = len(row["choices"])
        if task.partial:
            contexts = tuple(row["context"])
            norm = tuple(len(c) for c in contexts)
        else:
            contexts = (row["context"],) * k
            norm = tuple(len(c) for c in row["choices"])
        items.append(Item(id=str(row["id"]), contexts=contexts, label=row["label"], norm_chars=norm,
                          continuations=tuple(delim + c for c in row["choices"])))
    return items


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> Pair:
    """Token ids of (context, continuation), split as lm-eval splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_bos)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_bos)["input_ids"]
    if not ctx:
        raise DataError(f"context {context!r} encodes to no tokens", "give every item a non-empty context")
    return ctx, whole[len(ctx):]


def model_max_length(model, default: int = 2048) -> int:
    """Longest sequence the model reads (the same lookup lm-eval uses)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sum_logprobs(logits: torch.Tensor, targets: list[int]) -> float:
    """logits (m, V) predicting ``targets`` (m,) -> summed log-probability, in float32."""
    logp = logits.float().log_softmax(-1)                                         # (m, V)
    idx = torch.tensor(targets, device=logits.device)[:, None]                    # (m, 1)
    return logp.gather(-1, idx).sum().item()


def _keeps_logits(model) -> bool:
    """Whether ``model.forward`` can project only some positions through the LM head."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _logits_at(model, seqs: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
    """Run ``seqs`` as one right-padded batch; logits (n, m, V) at ``positions`` (n, m) only."""
    dev = _device(model)
    ids, mask = pad_right(seqs, device=dev)                                      # (n, T) each
    mask = mask.long()
    pos = torch.tensor(positions, dtype=torch.long, device=dev)                  # (n, m)
    if _keeps_logits(model):
        # the (n, T, vocab) logits of long contexts are large: project only the positions scored
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=pos).logits  # (n, m, V)
        if tuple(logits.shape[:2]) == tuple(pos.shape):
            return logits
    logits = model(input_ids=ids, attention_mask=mask).logits                     # (n, T, V)
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))      # (n, m, V)


@torch.no_grad()
def _last_token(model, contexts: list[list[int]], conts: list[list[list[int]]]) -> list[list[float]]:
    """Items whose continuations are all one token: each context runs once, all items in one batch."""
    logits = _logits_at(model, contexts, [[len(c) - 1] for c in contexts])        # (n, 1, V)
    return [[_sum_logprobs(logits[i], x) for x in xs] for i, xs in enumerate(conts)]


@torch.no_grad()
def _shared_context(model, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """Run ``ctx`` once, then all continuations (k of them) as one batch on copies of its KV cache."""
    dev = _device(model)
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}  # only the last position predicts x0
    out = model(input_ids=torch.tensor([ctx], device=dev), use_cache=True, **extra)
    first = out.logits[0, -1:]                                                   # (1, V) predicts x0
    lls = [_sum_logprobs(first, x[:1]) for x in conts]
    longest = max(len(x) for x in conts)
    if longest > 1:
        k = len(conts)
        cache = out.cache
        cache.batch_repeat_interleave(k)                                          # (1, ...) -> (k, ...)
        ids = torch.zeros(k, longest - 1, dtype=torch.long, device=dev)          # (k, Lx - 1), right-padded
        for i, x in enumerate(conts):
            ids[i, :len(x) - 1] = torch.tensor(x[:-1])
        # right padding needs no mask: causal attention never lets a real token see a later pad
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits        # (k, Lx - 1, V)
        for i, x in enumerate(conts):
            if len(x) > 1:
                lls[i] += _sum_logprobs(logits[i, :len(x) - 1], x[1:])
    return lls


@torch.no_grad()
def _full_sequences(model, pairs: list[Pair], max_length: int) -> list[float]:
    """One batch of (context, continuation) pairs, each as its own sequence, left-truncated like lm-eval."""
    seqs = [(c + x)[-(max_length + 1):] for c, x in pairs]                        # each (L_i,)
    longest = max(len(x) for _, x in pairs)
    # positions predicting the continuation, padded to ``longest`` by repeating the first one
    positions = [[len(s) - 1 - len(x) + j if j < len(x) else len(s) - 1 - len(x) for j in range(longest)]
                 for (_, x), s in zip(pairs, seqs)]
    logits = _logits_at(model, [s[:-1] for s in seqs], positions)                # (n, longest, V)
    return [_sum_logprobs(logits[i, :len(x)], x) for i, (_, x) in enumerate(pairs)]


def score_pairs(model, items: list[list[Pair]], *, max_length: int, batch_size: int = 8,
                progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Summed log-likelihood of every continuation given its context, for many items at once.

    Items whose choices share one context run it once: all one-token choices (yes/no) from batched forwards
    over the contexts, longer ones through the context's KV cache. The rest (partial scoring, or sequences
    past ``max_length``) run as separate sequences, batched across items. Batches group rows of similar
    length, so little is spent on padding. The batches run several at once with single-threaded kernels
    (``diet.parallel``), so the log-likelihoods are the same bytes at any thread count. ``progress(n)`` is
    called with the items finished so far.
    """
    last, cached, full = [], [], []
    for n, pairs in enumerate(items):
        for _, x in pairs:
            if not x:
                raise DataError("a continuation encodes to no tokens", "give every choice a non-empty text")
            if len(x) > max_length:
                raise DataError(f"a continuation of {len(x)} tokens exceeds the model's {max_length}",
                                "shorten the choices")
        shared = len(pairs) > 1 and len({tuple(c) for c, _ in pairs}) == 1 and all(
            len(c) + len(x) <= max_length + 1 for c, x in pairs)
        if shared and all(len(x) == 1 for _, x in pairs):
            last.append(n)
        elif shared:
            cached.append(n)
        else:
            full.append(n)

    # jobs: (items they finish, pairs they score as (item, choice), a function of nothing returning the lls)
    jobs: list[tuple[int, list[tuple[int, int]], Callable[[], list[float]]]] = []
    for batch in by_length([len(items[n][0][0]) for n in last], batch_size):
        chunk = [last[i] for i in batch]
        jobs.append((len(chunk), [(n, j) for n in chunk for j in range(len(items[n]))],
                     lambda chunk=chunk: [ll for item in _last_token(model, [items[n][0][0] for n in chunk],
                                                                     [[x for _, x in items[n]] for n in chunk])
                                          for ll in item]))
    for n in cached:
        jobs.append((1, [(n, j) for j in range(len(items[n]))],
                     lambda n=n: _shared_context(model, items[n][0][0], [x for _, x in items[n]])))
    flat = [(n, j) for n in full for j in range(len(items[n]))]
    for k, batch in enumerate(by_length([min(len(items[n][j][0]) + len(items[n][j][1]), max_length + 1)
                                         for n, j in flat], batch_size)):
        keys = [flat[i] for i in batch]
        last_of_item = sum(1 for n, j in keys if j == len(items[n]) - 1)   # items counted once, at their last pair
        jobs.append((last_of_item, keys,
                     lambda keys=keys: _full_sequences(model, [items[n][j] for n, j in keys], max_length)))

    lls: list[list[float | None]] = [[None] * len(pairs) for pairs in items]
    done = 0
    for (finished, keys, _), scored in zip(jobs, map_batches(lambda job: job[2](), jobs, _device(model))):
        for (n, j), ll in zip(keys, scored):
            lls[n][j] = ll
        done += finished
        if progress is not None:
            progress(done)
    return lls


def choice_logliks(model, pairs: list[Pair], *, max_length: int, batch_size: int = 8) -> list[float]:
    """Summed log-likelihood of each pair's continuation given its context (one item)."""
    return score_pairs(model, [pairs], max_length=max_length, batch_size=batch_size)[0]


def item_result(item: Item, lls: list[float]) -> dict:
    """lm-eval's per-item acc / acc_norm (argmax keeps the first of equal values, as numpy's does)."""
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    normed = [ll / n for ll, n in zip(lls, item.norm_chars)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return {"id": item.id, "label": item.label, "lls": lls, "pred": pred, "pred_norm": pred_norm,
            "acc": float(pred == item.label), "acc_norm": float(pred_norm == item.label)}


def _mean_stderr(xs: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's ``mean_stderr``)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def summarize(items: list[dict]) -> dict:
    """Per-item results -> {acc, acc_stderr, acc_norm, acc_norm_stderr, n}."""
    out: dict = {"n": len(items)}
    for key in ("acc", "acc_norm"):
        xs = [float(r[key]) for r in items]
        out[key] = sum(xs) / len(xs) if xs else float("nan")
        out[f"{key}_stderr"] = _mean_stderr(xs)
    return out


def score_task(model, tokenizer, task: EvalTask, *, add_bos: bool | None = None, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Score one loaded task directly: summary metrics plus ``items`` (per-item results)."""
    add_bos = resolve_add_bos(model, tokenizer, add_bos)
    max_length = model_max_length(model)
    model.eval()
    items = build_items(task)
    pairs = [[encode_pair(tokenizer, c, x, add_bos) for c, x in zip(it.contexts, it.continuations)]
             for it in items]
    lls = score_pairs(model, pairs, max_length=max_length, batch_size=batch_size,
                      progress=None if progress is None else (lambda n: progress(n, len(items))))
    results = [item_result(it, ll) for it, ll in zip(items, lls)]
    return {**summarize(results), "items": results}


def evaluate_tasks_direct(model, tokenizer, tasks: dict[str, str | Path], *, batch_size: int = 8,
                          limit: int | None = None, add_bos: bool | None = None) -> dict[str, dict]:
    """Same contract as ``diet.evaluation.harness.evaluate_tasks``, without lm-eval."""
    loaded = {name: load_eval_task(name, data_dir, limit=limit) for name, data_dir in tasks.items()}
    add_bos = resolve_add_bos(model, tokenizer, add_bos)
    out = {}
    for i, (name, task) in enumerate(loaded.items(), 1):
        log.info("task %d/%d: %s (%d items, direct)", i, len(loaded), name, len(task.rows))
        start = time.perf_counter()
        out[name] = score_task(model, tokenizer, task, add_bos=add_bos, batch_size=batch_size)
        log.info("%s: acc %.4f  acc_norm %.4f  (n=%d, %.1fs)", name, out[name]["acc"], out[name]["acc_norm"],
                 out[name]["n"], time.perf_counter() - start)
    return out
