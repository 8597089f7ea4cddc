"""DIET on a GPU: scoring, evaluation and pruned-model speed on a random model with Gemma-2-2B's shapes.

    python benchmarks/gpu.py                 # on a CUDA machine: the Gemma-2-2B shape, bfloat16 (a few minutes)
    python benchmarks/gpu.py --small         # the same code on a small shape (the default without a GPU)

The model is a seeded random Gemma-2 built from its config (hidden 2304, intermediate 9216, 26 layers, 8 heads
over 4 KV heads, head_dim 256, vocabulary 256000; ``--small``: hidden 64, intermediate 256, 4 layers, 4 / 2
heads, head_dim 16, vocabulary 512), so nothing is downloaded; speed depends on shapes, not on weights. Inputs
are seeded random token ids, read through a tokenizer that parses ids (``IdTokenizer``), so the library's own
code paths run unchanged:

1. **Scoring overhead and memory** per ``--batch-sizes``: ``diet.scoring.score_texts`` (hooks and running
   sums, at ``--precision``: ``auto`` is the model's dtype) against a plain forward over the same
   batches (``benchmarks/scoring.py``'s ``Runner``); tokens/s of each, their ratio within a round (median
   over ``--repeats`` rounds), and the peak memory above the loaded model (GPU: ``max_memory_allocated``;
   CPU: resident set).
2. **Evaluation throughput** per batch size: ``diet.evaluation.loglik.score_pairs`` on two-choice items with
   one-token answers (BoolQ's form: every context runs once), context tokens per second and peak memory.
3. **Pruned-model speed-up**: masks from DIET's vote over two random "tasks" scored in step 1, at
   ``--sparsities`` x ``--layouts`` (mlp group), applied physically; prefill of a ``--prompt-tokens`` prompt
   and time per greedily decoded token (``benchmarks/latency.py``'s ``time_once``, with the GPU synchronised
   before each clock reading). Every round times every variant once in a rotated order; ratios are pruned /
   dense within a round, median over rounds.

Writes ``--out`` (JSON, default ``benchmarks/results/gpu.json``, or ``gpu-small.json`` with ``--small``) and a
markdown table beside it (``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from latency import parameter_bytes, time_once  # noqa: E402
from scoring import Runner, peak_above_now  # noqa: E402

from diet import api  # noqa: E402
from diet.config import MergeConfig, PruneConfig, SelectConfig  # noqa: E402
from diet.io import write_json, write_text  # noqa: E402
from diet.devices import resolve_device  # noqa: E402
from diet.geometry import parameter_counts  # noqa: E402
from diet.registry import LAYOUTS  # noqa: E402
from diet.scorefile import split_scores
from diet.scoring import resolve_precision  # noqa: E402

#: Gemma-2-2B's shapes (google/gemma-2-2b config.json), and a small stand-in with the same structure
GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256,
                 sliding_window=4096, max_position_embeddings=8192)
SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, query_pre_attn_scalar=16,
             sliding_window=64, max_position_embeddings=1024)
PAD, EOS, BOS = 0, 1, 2


class IdTokenizer:
    """A tokenizer for texts that are token ids written out ("17 4 250"): the benchmark feeds seeded random
    ids through the same ``tokenizer(text)`` calls the library makes for real text. A word that is not a
    number (the library's own probes, e.g. "a") is id 3."""

    pad_token_id, eos_token_id, bos_token_id = PAD, EOS, BOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [int(t) if t.isdigit() else 3 for t in text.split()]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


def random_texts(n: int, length: int, vocab: int, seed: int) -> list[str]:
    """``n`` texts of ``length`` random ids each (special ids excluded), seeded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)                    # (n, length)
    return [" ".join(map(str, row.tolist())) for row in ids]


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A seeded random Gemma-2 causal LM of ``shape``, built on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, **shape)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


class Device:
    """Clock and memory probes for one device: CUDA synchronises and reads the allocator; the CPU reads RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> float:
        """Wall seconds of ``fn()``, queued GPU work included."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def peak_mb(self, fn) -> float:
        """Peak memory above the current state while ``fn()`` runs, MiB."""
        if not self.cuda:
            return peak_above_now(fn)[0]
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20


def scoring_rows(runner: Runner, dev: Device, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Scoring vs a plain forward over the same batches, per batch size: tokens/s, ratio, peak memory."""
    runner.plain(batch_sizes[0])  # warm-up: kernels chosen, memory pools grown
    rows = []
    for bs in batch_sizes:
        plain, score = [], []
        for _ in range(repeats):
            plain.append(dev.timed(lambda: runner.plain(bs)))
            score.append(dev.timed(lambda: runner.score(bs)))
        rows.append({"batch_size": bs, "tokens": runner.n_tokens,
                     "plain_tokens_per_s": runner.n_tokens / statistics.median(plain),
                     "score_tokens_per_s": runner.n_tokens / statistics.median(score),
                     "score_over_plain": statistics.median(s / p for s, p in zip(score, plain)),
                     "plain_peak_mb": dev.peak_mb(lambda: runner.plain(bs)),
                     "score_peak_mb": dev.peak_mb(lambda: runner.score(bs)),
                     "plain_s_all": plain, "score_s_all": score})
        print(f"scoring, batch {bs}: {rows[-1]['score_tokens_per_s']:.0f} tokens/s, "
              f"x{rows[-1]['score_over_plain']:.2f} a plain forward", file=sys.stderr)
    return rows


def evaluation_rows(model, encoded: list[list[int]], dev: Device, batch_sizes: list[int], repeats: int,
                    max_length: int) -> list[dict]:
    """Two-choice items with one-token answers (" no" / " yes"), each context run once: context tokens/s."""
    from diet.evaluation.loglik import score_pairs

    items = [[(ids, [3]), (ids, [4])] for ids in encoded]                          # per item: (context, answer)
    tokens = sum(len(ids) for ids in encoded)
    rows = []
    for bs in batch_sizes:
        run = lambda: score_pairs(model, items, max_length=max_length, batch_size=bs)  # noqa: E731
        run()  # warm-up at this batch size
        times = [dev.timed(run) for _ in range(repeats)]
        rows.append({"batch_size": bs, "items": len(items), "tokens": tokens,
                     "tokens_per_s": tokens / statistics.median(times), "peak_mb": dev.peak_mb(run),
                     "s_all": times})
        print(f"evaluation, batch {bs}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    return rows


def pruned_variants(dense, task_scores: dict, sparsities: list[float], layouts: list[str]) -> list[dict]:
    """One physically pruned copy of ``dense`` per (sparsity, layout), masked by DIET's vote."""
    geo = api.geometry(dense, ("mlp",))
    variants = []
    for sparsity in sparsities:
        for layout in layouts:
            _, mask = api.plan(task_scores, geo, merge_cfg=MergeConfig(), prune_cfg=PruneConfig(sparsity, ("mlp",)),
                               select_cfg=SelectConfig(layout=layout))
            widths = mask.widths["mlp"]
            variants.append({"name": f"{layout} {sparsity:g}", "sparsity": sparsity, "layout": layout,
                             "model": api.apply(copy.deepcopy(dense), mask, layout),
                             "achieved_sparsity": mask.sparsity, "mlp_width_min": min(widths),
                             "mlp_width_max": max(widths)})
    return variants


def speed_rows(variants: list[dict], dev: Device, prompt: torch.Tensor, new_tokens: int, repeats: int) -> list[dict]:
    """Prefill and decode seconds of every variant in rotated rounds; ratios to the dense model (first)."""
    for v in variants:
        time_once(v["model"], prompt[:, :16], 2, dev.sync)  # warm-up
        v["times"] = {"prefill": [], "decode": []}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t = time_once(v["model"], prompt, new_tokens, dev.sync)
            v["times"]["prefill"].append(t["prefill_wall"])
            v["times"]["decode"].append(t["decode_wall"])
    dense = variants[0]["times"]
    rows = []
    for v in variants:
        counts = parameter_counts(v["model"])
        row = {k: v.get(k) for k in ("name", "sparsity", "layout", "achieved_sparsity", "mlp_width_min",
                                     "mlp_width_max")}
        row.update(params_total=counts["total"], params_decoder=counts["decoder"],
                   param_mb=parameter_bytes(v["model"]) / 2**20)
        for kind in ("prefill", "decode"):
            ts = v["times"][kind]
            row[f"{kind}_ms"] = 1000 * statistics.median(ts)
            row[f"{kind}_speedup"] = statistics.median(d / p for d, p in zip(dense[kind], ts))
            row[f"{kind}_ms_all"] = [1000 * t for t in ts]
        rows.append(row)
    return rows


def run(args) -> dict:
    device = resolve_device(args.device)
    small = args.small if args.small is not None else device.type != "cuda"
    dtype = getattr(torch, args.dtype)
    precision = resolve_precision(args.precision, device)
    dev = Device(device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shape = SMALL if small else GEMMA2_2B
    n, length = (args.n or (8 if small else 64)), (args.seq_len or (32 if small else 512))
    batch_sizes = args.batch_sizes or ([1, 4] if small else [1, 4, 8, 16, 32])
    prompt_tokens, new_tokens = args.prompt_tokens or (32 if small else 256), args.new_tokens or (4 if small else 32)

    start = time.perf_counter()
    dense = build_model(shape, dtype, device)
    print(f"built the {'small' if small else 'Gemma-2-2B'}-shaped model in {time.perf_counter() - start:.1f} s "
          f"({parameter_counts(dense)['total'] / 1e6:.1f}M parameters, {args.dtype}, {device})", file=sys.stderr)
    tokenizer = IdTokenizer()
    vocab = shape["vocab_size"]
    tasks = {f"random{i}": random_texts(n, length, vocab, seed=i) for i in range(2)}
    runner = Runner(dense, tokenizer, tasks["random0"], ("mlp", "attention"), length + 1, precision=precision)
    scoring = scoring_rows(runner, dev, batch_sizes, args.repeats)
    task_scores = {}
    for name, texts in tasks.items():
        runner.texts = texts
        tensors, _ = runner.score(batch_sizes[-1])
        task_scores[name] = {"mlp": split_scores(tensors)[0]["mlp"]}
    evaluation = evaluation_rows(dense, runner.encoded, dev, batch_sizes, args.repeats, max_length=length + 1)
    del runner
    variants = [{"name": "dense", "sparsity": 0.0, "layout": "-", "model": dense, "achieved_sparsity": 0.0,
                 "mlp_width_min": shape["intermediate_size"], "mlp_width_max": shape["intermediate_size"]}]
    variants += pruned_variants(dense, task_scores, args.sparsities, args.layouts)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(7)).to(device)
    speed = speed_rows(variants, dev, prompt, new_tokens, args.repeats)          # prompt: (1, P)
    return {
        "machine": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if dev.cuda else None,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "platform": platform.platform()},
        "settings": {"shape": "small" if small else "gemma-2-2b", "config": shape, "dtype": args.dtype,
                     "precision": precision, "samples": n, "tokens_per_sample": length + 1,
                     "batch_sizes": batch_sizes, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "repeats": args.repeats, "group": "mlp",
                     "select": {"min_keep": SelectConfig().min_keep, "multiple": SelectConfig().multiple}},
        "scoring": scoring, "evaluation": evaluation, "pruned": speed,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"{s['shape']} shape, {s['dtype']}, scoring precision {s['precision']}, on "
             f"{result['machine']['gpu'] or result['machine']['device']}; {s['samples']} samples of "
             f"{s['tokens_per_sample']} tokens", "",
             "| batch size | plain forward tokens/s | scoring tokens/s | scoring / plain time | plain peak MB "
             "| scoring peak MB | evaluation tokens/s | evaluation peak MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sc, ev in zip(result["scoring"], result["evaluation"]):
        lines.append(f"| {sc['batch_size']} | {sc['plain_tokens_per_s']:.0f} | {sc['score_tokens_per_s']:.0f} "
                     f"| {sc['score_over_plain']:.2f} | {sc['plain_peak_mb']:.0f} | {sc['score_peak_mb']:.0f} "
                     f"| {ev['tokens_per_s']:.0f} | {ev['peak_mb']:.0f} |")
    lines += ["", f"Prefill of {s['prompt_tokens']} tokens and greedy decoding of {s['new_tokens']} (KV cache); "
              "speed-up = dense time / pruned time, median of per-round ratios:", "",
              "| variant | achieved sparsity | MLP width min-max | params (M) | param MB | prefill ms | speed-up "
              "| ms/token | speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["pruned"]:
        lines.append(f"| {r['name']} | {r['achieved_sparsity']:.3f} | {r['mlp_width_min']}-{r['mlp_width_max']} "
                     f"| {r['params_total'] / 1e6:.1f} | {r['param_mb']:.1f} | {r['prefill_ms']:.1f} "
                     f"| {r['prefill_speedup']:.2f} | {r['decode_ms']:.2f} | {r['decode_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="the small shape (default when the device is not a GPU)")
    size.add_argument("--full", dest="small", action="store_false", help="Gemma-2-2B's shape even on the CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as model.device)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--precision", default="auto", choices=["auto", "model", "float64"],
                   help="scoring precision (as score.precision; auto: the model's dtype)")
    p.add_argument("--n", type=int, help="samples (default 64; small 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sample after BOS (default 512; small 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 4 8 16 32; small 1 4")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--layouts", nargs="+", default=["uniform", "global"], choices=LAYOUTS.names())
    p.add_argument("--prompt-tokens", type=int, help="default 256; small 32")
    p.add_argument("--new-tokens", type=int, help="default 32; small 4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu.json; small: gpu-small.json)")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out or HERE / "results" / ("gpu-small.json" if result["settings"]["shape"] == "small"
                                               else "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    md = markdown(result)
    write_text(out.with_suffix(".md"), md)
    print(md)
    return result


if __name__ == "__main__":
    main()
