"""Whether a sequence starts with BOS, decided once and checked against the tokenizer.

Every pass over text (calibration scoring, lm-eval, the direct log-likelihood scorer, perplexity) takes
``add_bos`` from ``resolve_add_bos``, so calibration and evaluation see the same token sequences. BOS is
prepended when the model family needs it (``adapter.needs_bos``: Gemma's log-likelihoods collapse without
it) or when the tokenizer adds it by default anyway (lm-eval's default for such tokenizers).
"""

from __future__ import annotations

from diet.errors import ModelError


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` with its default special tokens starts with ``bos_token_id``."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def resolve_add_bos(model, tokenizer, add_bos: bool | None = None) -> bool:
    """``add_bos`` if given, else: the adapter says ``needs_bos`` or the tokenizer adds BOS by default."""
    if add_bos is None:
        from diet.adapters import get_adapter

        add_bos = bool(get_adapter(model).needs_bos) or tokenizer_adds_bos(tokenizer)
    check_tokenizer(tokenizer, add_bos)
    return add_bos


def check_tokenizer(tokenizer, add_bos: bool) -> None:
    """Refuse a tokenizer that cannot give the sequences the scorers assume.

    With ``add_bos`` it must have a BOS token and prepend it under ``add_special_tokens=True``; either way
    it must not append EOS (that would end the context in the middle of a context + continuation pair).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_bos:
        if bos is None:
            raise ModelError("the model needs a BOS token first in every sequence, but its tokenizer has no "
                             "bos_token", "use the model's own tokenizer, or set bos_token in tokenizer_config.json")
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if not ids or ids[0] != bos:
            raise ModelError("the model needs a BOS token first in every sequence, but its tokenizer does not "
                             "prepend it", "set add_bos_token: true in the tokenizer's tokenizer_config.json")
    ids = tokenizer("a", add_special_tokens=add_bos)["input_ids"]
    if eos is not None and eos != bos and len(ids) > 1 and ids[-1] == eos:
        raise ModelError("the tokenizer appends an EOS token to every text; log-likelihood scoring needs "
                         "context and continuation to join", "set add_eos_token: false in tokenizer_config.json")
