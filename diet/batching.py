"""Right-padded batches of token-id sequences, shared by scoring, evaluation and perplexity."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T) long, attention mask (B, T) bool), padded with ``pad_id`` on the right to the longest.

    Right padding keeps every real token at its own position; causal attention never lets a real token see
    a later pad, so the mask matters only to statistics over tokens and to the model's attention implementation.
    """
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)   # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)          # (B, T)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = True
    return ids.to(device), mask.to(device)


def by_length(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches, longest first, so rows of similar length share a batch (little padding).

    A batch holds at most ``batch_size`` rows and, with ``max_tokens``, at most ``max_tokens`` padded tokens
    (its longest row's length times its rows; never fewer than one row).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        rows = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // lengths[order[start]]))
        batches.append(order[start:start + rows])
        start += rows
    return batches
