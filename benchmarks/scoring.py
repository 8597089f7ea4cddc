"""Cost of scoring calibration samples, against a plain forward pass over the very same batches.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py --model models/base --task arc_easy --identity
    OMP_NUM_THREADS=2 python benchmarks/scoring.py --model models/base --task arc_easy

1. Time: for every ``--batch-sizes`` entry, ``diet.scoring.score_texts`` on ``--n`` samples of ``--task`` and a
   plain forward over the same batches (same tokens, right padding and no attention mask as in scoring,
   ``use_cache=False``, ``logits_to_keep=1``; one batch after the other with torch's own threads, while scoring
   runs ``diet.parallel``'s batches over worker threads), in alternation for ``--repeats`` rounds; the ratio
   is score / plain within a round, median over rounds. Times are the process's CPU time (the work done; a
   shared machine's other jobs inflate wall clock), wall clock beside.
2. Memory, in a child process started with a fixed malloc mmap threshold (so freed activation buffers go
   back to the system and one measurement does not hide the next): the peak resident memory above the state
   just before each run (VmHWM, reset between runs), for scoring and for the plain forward at every batch size;
   and, at ``--growth-batch``, for scoring an increasing number of samples, with the bytes held by the score
   accumulators (running sums) after the run. Weights are touched by a warm-up before any measurement. The
   peak resident memory with the model included (the resident set before the run plus the peak above it) is
   given for both, and its ratio.
3. Identity (``--identity``): in child processes, the score file's bytes (sha256) at 1, 2 and 4 threads, and
   under each ``ATEN_CPU_CAPABILITY`` (``default``: no vector kernels; ``avx2``; ``avx512``), as a stand-in for
   another CPU; where two digests differ, the share of score values that differ and by how many float32 steps.

Writes ``benchmarks/results/scoring.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diet.adapters import get_adapter  # noqa: E402
from diet.config import ScoreConfig  # noqa: E402
from diet.io import write_json  # noqa: E402
from diet.checkpoint import load_model  # noqa: E402
from diet.batching import pad_right  # noqa: E402
from diet.scoring import encode_texts, record_activations, score_texts  # noqa: E402
from diet.tokens import resolve_add_bos  # noqa: E402

MMAP_THRESHOLD = 1 << 16  # bytes: allocations above it are mmapped and unmapped on free


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status: the memory probe needs Linux")


def peak_above_now(fn) -> tuple[float, object]:
    """(peak resident MiB above the current RSS while ``fn()`` runs, its result). Resets VmHWM first."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    out = fn()
    return (_status_kb("VmHWM") - base) / 1024, out


def load(args):
    from transformers import AutoTokenizer

    model = load_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return model, tokenizer


def calibration_texts(task: str, n: int, prepared: str | None) -> list[str]:
    from diet.tasks import load_task, prepare_task, read_prepared

    if prepared:
        rows, _ = read_prepared(Path(prepared) / task, "calib")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prepare_task(load_task(task, ROOT / "data" / "tasks"), Path(tmp) / task, n_samples=n, seed=0,
                         eval_limit=1, eval_seed=0)
            rows, _ = read_prepared(Path(tmp) / task, "calib")
    if len(rows) < n:
        raise SystemExit(f"{task} has {len(rows)} prepared calibration rows, --n asks for {n}")
    return [r["text"] for r in rows[:n]]


class Runner:
    """Scoring and the plain forward on identical batches (the batching of ``score_texts``)."""

    def __init__(self, model, tokenizer, texts, groups, max_length, precision: str = "model"):
        self.model, self.tokenizer, self.texts, self.groups = model, tokenizer, texts, groups
        self.precision = precision
        self.device = next(model.parameters()).device
        self.adapter = get_adapter(model)
        self.max_length = max_length
        self.add_bos = resolve_add_bos(model, tokenizer)
        self.encoded = encode_texts(tokenizer, texts, max_length=max_length, add_bos=self.add_bos)
        self.order = sorted(range(len(self.encoded)), key=lambda i: (-len(self.encoded[i]), i))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.extra = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.extra["logits_to_keep"] = 1
        self.n_tokens = sum(len(e) for e in self.encoded)

    def batches(self, batch_size: int, n: int | None = None):
        order = self.order if n is None else sorted(range(n), key=lambda i: (-len(self.encoded[i]), i))
        for start in range(0, len(order), batch_size):
            yield pad_right([self.encoded[i] for i in order[start:start + batch_size]], self.pad_id,
                            device=self.device)                                     # (B, T) x2

    @torch.no_grad()
    def plain(self, batch_size: int) -> None:
        """The model's own forward on scoring's batches (no attention mask, as scoring), one batch after the
        other with torch's threads as they are: what a user's plain forward does."""
        for ids, _ in self.batches(batch_size):
            self.model(input_ids=ids, **self.extra)

    def score(self, batch_size: int, n: int | None = None):
        texts = self.texts if n is None else self.texts[:n]
        return score_texts(self.model, self.tokenizer, texts, groups=self.groups, statistic="mean_abs",
                           weight_norm=False, batch_size=batch_size, max_length=self.max_length,
                           add_bos=self.add_bos, progress=False, adapter=self.adapter, precision=self.precision)

    @torch.no_grad()
    def accumulator_bytes(self, batch_size: int, n: int) -> tuple[int, int]:
        """(bytes of all running sums after ``n`` samples, tokens counted) via the scoring hooks themselves."""
        with record_activations(self.model, self.adapter, self.groups) as rec:
            for ids, mask in self.batches(batch_size, n):
                rec.mask = mask
                self.model(input_ids=ids, **self.extra)
            stats = [s for per_layer in rec.stats.values() for s in per_layer]
            return (sum(t.numel() * t.element_size() for s in stats for t in (s.sum, s.sum_signed, s.sum_sq)),
                    stats[0].n_tokens)


def _timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def time_runs(runner: Runner, batch_sizes, repeats: int) -> list[dict]:
    rows = []
    runner.plain(batch_sizes[0])  # warm-up
    for bs in batch_sizes:
        plain, score = [], []
        for _ in range(repeats):
            plain.append(_timed(lambda: runner.plain(bs)))
            score.append(_timed(lambda: runner.score(bs)))
        rows.append({"batch_size": bs,
                     "plain_cpu_s": statistics.median(c for c, _ in plain),
                     "score_cpu_s": statistics.median(c for c, _ in score),
                     "ratio": statistics.median(s[0] / p[0] for s, p in zip(score, plain)),
                     "plain_wall_s": statistics.median(w for _, w in plain),
                     "score_wall_s": statistics.median(w for _, w in score),
                     "wall_ratio": statistics.median(s[1] / p[1] for s, p in zip(score, plain)),
                     "plain_all": plain, "score_all": score})
        print(f"timed batch {bs}: score/plain CPU time {rows[-1]['ratio']:.2f}", file=sys.stderr)
    return rows


def memory_child(args) -> None:
    """Memory measurements; runs in a process started with MALLOC_MMAP_THRESHOLD_ fixed."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load(args)
    texts = calibration_texts(args.task, args.n, args.prepared)
    runner = Runner(model, tokenizer, texts, tuple(args.groups), args.max_length)
    runner.plain(1)  # touch every weight page (the checkpoint is memory-mapped) before measuring
    by_batch = []
    for bs in args.batch_sizes:
        base_mb = _status_kb("VmRSS") / 1024
        plain_mb, _ = peak_above_now(lambda: runner.plain(bs))
        score_mb, _ = peak_above_now(lambda: runner.score(bs))
        by_batch.append({"batch_size": bs, "plain_peak_mb": plain_mb, "score_peak_mb": score_mb,
                         "resident_before_mb": base_mb, "plain_rss_mb": base_mb + plain_mb,
                         "score_rss_mb": base_mb + score_mb, "rss_ratio": (base_mb + score_mb) / (base_mb + plain_mb)})
    growth = []
    for n in args.growth_samples:
        score_mb, (_, stats) = peak_above_now(lambda: runner.score(args.growth_batch, n))
        acc_bytes, acc_tokens = runner.accumulator_bytes(args.growth_batch, n)
        assert acc_tokens == stats["n_tokens"]
        growth.append({"samples": n, "tokens": stats["n_tokens"], "score_peak_mb": score_mb,
                       "accumulator_bytes": acc_bytes})
    print(json.dumps({"by_batch": by_batch, "growth": growth}))


def identity_child(args) -> None:
    """Score at this process's thread count and CPU capability; save the tensors to ``--identity-child``."""
    from safetensors.torch import save_file

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load(args)
    texts = calibration_texts(args.task, args.n, args.prepared)
    tensors, _ = Runner(model, tokenizer, texts, tuple(args.groups), args.max_length).score(args.growth_batch)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.identity_child)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))


def _float32_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many float32 values lie between ``a`` and ``b``, element-wise (same-sign values)."""
    return (a.float().view(torch.int32).long() - b.float().view(torch.int32).long()).abs()


def identity(args, argv: list[str]) -> dict:
    """Digests of the score tensors at several thread counts and CPU capabilities (module doc, 3)."""
    import hashlib

    from safetensors.torch import load_file

    runs = [(f"{n} thread{'s' if n > 1 else ''}", {"OMP_NUM_THREADS": str(n)}) for n in (1, 2, 4)]
    runs += [(f"ATEN_CPU_CAPABILITY={c}, 2 threads", {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": c})
             for c in ("default", "avx2", "avx512")]
    rows, tensors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs:
            out = Path(tmp) / f"{len(rows)}.safetensors"
            proc = subprocess.run([sys.executable, __file__, "--identity-child", str(out), *argv],
                                  env={**os.environ, **extra}, capture_output=True, text=True, check=False)
            if proc.returncode:
                rows.append({"run": name, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            got = load_file(out)
            tensors[name] = got
            digest = hashlib.sha256(b"".join(got[k].numpy().tobytes() for k in sorted(got))).hexdigest()
            rows.append({"run": name, "sha256": digest,
                         "capability": json.loads(proc.stdout.strip().splitlines()[-1])["capability"]})
    ref_name = runs[0][0]
    ref = tensors.get(ref_name)
    for row in rows:
        got = tensors.get(row["run"])
        if ref is None or got is None:
            continue
        steps = torch.cat([_float32_steps(got[k], ref[k]).flatten() for k in sorted(ref)])
        # the largest difference relative to its tensor's largest magnitude (float32 steps mislead near 0)
        rel = max(float((got[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max().clamp_min(1e-30))
                  for k in ref)
        row.update({"same_bytes_as": ref_name if row["sha256"] == rows[0]["sha256"] else None,
                    "values": int(steps.numel()), "differing_share": float((steps > 0).double().mean()),
                    "max_float32_steps": int(steps.max()), "max_relative_to_tensor_max": rel})
    return {"reference": ref_name, "runs": rows}


def run(args, argv: list[str]) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load(args)
    texts = calibration_texts(args.task, args.n, args.prepared)
    runner = Runner(model, tokenizer, texts, tuple(args.groups), args.max_length)
    timing = time_runs(runner, args.batch_sizes, args.repeats)
    n_tokens, config = runner.n_tokens, model.config
    del model, runner

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, __file__, "--memory-child", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-3000:]}")
    memory = json.loads(proc.stdout.strip().splitlines()[-1])
    for row, mem in zip(timing, memory["by_batch"]):
        row.update(mem)
    same = identity(args, argv) if args.identity else None
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__},
        "settings": {"model": args.model, "task": args.task, "samples": args.n, "tokens": n_tokens,
                     "groups": list(args.groups), "statistic": "mean_abs", "max_length": args.max_length,
                     "repeats": args.repeats, "layers": config.num_hidden_layers,
                     "intermediate_size": config.intermediate_size, "hidden_size": config.hidden_size,
                     "mmap_threshold": MMAP_THRESHOLD},
        "by_batch": timing,
        "growth": memory["growth"],
        "identity": same,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Scoring {s['samples']} {s['task']} samples ({s['tokens']} tokens), groups {', '.join(s['groups'])}:",
             "",
             "| batch size | plain forward CPU s | scoring CPU s | scoring / plain | (wall clock) "
             "| plain peak MB above model | scoring peak MB above model | peak RSS, model included: plain "
             "| scoring | scoring / plain |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["by_batch"]:
        lines.append(f"| {r['batch_size']} | {r['plain_cpu_s']:.2f} | {r['score_cpu_s']:.2f} | {r['ratio']:.2f} "
                     f"| {r['wall_ratio']:.2f} "
                     f"| {r['plain_peak_mb']:.0f} | {r['score_peak_mb']:.0f} | {r['plain_rss_mb']:.0f} "
                     f"| {r['score_rss_mb']:.0f} | {r['rss_ratio']:.2f} |")
    lines += ["", "| samples | tokens | scoring peak MB | accumulator bytes |", "|---:|---:|---:|---:|"]
    for r in result["growth"]:
        lines.append(f"| {r['samples']} | {r['tokens']} | {r['score_peak_mb']:.0f} | {r['accumulator_bytes']} |")
    if result.get("identity"):
        ident = result["identity"]
        lines += ["", f"Score bytes against {ident['reference']}:", "",
                  "| run | kernels | sha256 | same bytes | values differing | largest difference / tensor's "
                  "largest value |", "|---|---|---|---|---:|---:|"]
        for r in ident["runs"]:
            if "error" in r:
                lines.append(f"| {r['run']} | - | failed: {' '.join(r['error'])} | - | - | - |")
                continue
            lines.append(f"| {r['run']} | {r['capability']} | {r['sha256'][:12]} | "
                         f"{'yes' if r['same_bytes_as'] else 'no'} | {100 * r['differing_share']:.2f}% | "
                         f"{r['max_relative_to_tensor_max']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("DIET_BASE_MODEL"),
                   help="materialised base model folder (default: $DIET_BASE_MODEL)")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--prepared", help="folder of prepared tasks (<dir>/<task>/calib.jsonl); default: prepare now")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--groups", nargs="+", default=list(ScoreConfig().groups))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--growth-batch", type=int, default=8)
    p.add_argument("--growth-samples", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scoring.json"))
    p.add_argument("--identity", action="store_true",
                   help="also compare the score bytes across thread counts and ATEN_CPU_CAPABILITY values")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--identity-child", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or $DIET_BASE_MODEL) must name a materialised model folder")
    if args.memory_child:
        memory_child(args)
        return
    if args.identity_child:
        identity_child(args)
        return
    result = run(args, argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
