"""Wall-clock speed of a model on this machine: prefill time and greedy decoding time per token.

The prompt is a fixed pseudo-random token sequence (its own generator: the global RNG is untouched), so
dense and pruned models are timed on identical work. Figures depend on the machine and thread count, which
are recorded beside them; compare models only within one run of one machine.
"""

from __future__ import annotations

import statistics
import time

import torch

from diet.evaluation.loglik import model_max_length


@torch.no_grad()
def measure_latency(model, *, new_tokens: int, prompt_tokens: int = 256, repeats: int = 3,
                    seed: int = 0) -> dict:
    """{prefill_ms (median of ``repeats``), ms_per_token (greedy, KV cache), tokens_per_s, ...}."""
    model.eval()
    dev = next(model.parameters()).device
    prompt_tokens = max(1, min(prompt_tokens, model_max_length(model) - new_tokens))
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(vocab, (1, prompt_tokens), generator=gen).to(dev)     # (1, P)

    model(input_ids=prompt[:, :8])                                                # warm-up
    prefill = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill.append(time.perf_counter() - start)

    result = {"prefill_ms": 1000 * statistics.median(prefill), "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "device": str(dev), "threads": torch.get_num_threads()}
    if new_tokens > 0:
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)                                     # (1, 1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        result.update(ms_per_token=1000 * elapsed / new_tokens, tokens_per_s=new_tokens / elapsed)
    return result
