"""Dense vs pruned speed and size of the default model on this machine.

    OMP_NUM_THREADS=1 python benchmarks/latency.py --model /path/to/smollm2   # or omit --model to materialise it

Pruned variants: every ``--sparsities`` x ``--layouts`` (mlp group, default select constraints). Their masks
come from DIET itself: the majority vote of per-task scores on a small calibration set (``--tasks``,
``--n-calib`` samples each, scored once and reused for every variant). Or, with ``--experiments PATTERN``,
the pruned checkpoints (``models/pruned``) of the pipeline's finished DVC experiments whose names match, e.g.
those of ``diet-flow sweep --groups mlp,hidden,mlp+hidden`` (read from the DVC cache at each experiment's
commit; ``--repo`` is the project that ran them):

    OMP_NUM_THREADS=1 python benchmarks/latency.py --experiments 'vote-*-s0.2-20261129T0700*'

Per variant: parameter counts and bytes; prefill time of a ``--prompt-tokens`` prompt; time per greedily
decoded token over ``--new-tokens`` tokens (KV cache); and, in a fresh process that loads the saved checkpoint,
the peak resident memory above the process's state before loading.

Times are taken both as wall clock and as the process's CPU time. On a shared machine wall clock mostly
measures the other jobs; with one thread, CPU time measures this model's work (cache and memory-bandwidth
contention still leak in). Timing runs in ``--repeats`` rounds; every round times every variant once (in a
rotated order) so that a slow spell hits all variants alike. Ratios are pruned / dense within the same round,
then the median over rounds.

Writes ``benchmarks/results/latency.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diet import api  # noqa: E402
from diet.config import MergeConfig, PruneConfig, ScoreConfig, SelectConfig  # noqa: E402
from diet.io import write_json  # noqa: E402
from diet.checkpoint import load_model, save_pruned  # noqa: E402
from diet.registry import LAYOUTS  # noqa: E402
from diet.geometry import parameter_counts  # noqa: E402


def parameter_bytes(model) -> int:
    """Bytes of all parameters, a shared (tied) tensor counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fixed_prompt(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded pseudo-random prompt (1, n): every variant does identical work."""
    return torch.randint(vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def no_sync() -> None:
    """On the CPU every kernel has finished when the call returns: nothing to wait for."""


@torch.no_grad()
def time_once(model, prompt: torch.Tensor, new_tokens: int, sync=no_sync) -> dict[str, float]:
    """Seconds of one greedy run with the KV cache: prefill and per decoded token, wall clock and CPU time.

    ``sync`` waits for the device's queued kernels before each clock reading (``torch.cuda.synchronize`` on a
    GPU, whose calls return before the work is done)."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(input_ids=prompt, use_cache=True)
    sync()
    result = {"prefill_wall": time.perf_counter() - wall, "prefill_cpu": time.process_time() - cpu}
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)                    # (1, 1)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)                # (1, 1)
    sync()
    n = max(new_tokens, 1)
    result.update(decode_wall=(time.perf_counter() - wall) / n, decode_cpu=(time.process_time() - cpu) / n)
    return result


def peak_rss() -> int:
    """Peak resident bytes of this process image (VmHWM). ru_maxrss is not used: across fork + exec it keeps
    the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory probe needs Linux")


TIMES = ("prefill_wall", "prefill_cpu", "decode_wall", "decode_cpu")


#: a measure whose rounds spread wider than this share of their median is flagged as noisy (a busy machine)
NOISY_SPREAD = 0.25


def timing_summary(times: dict[str, list[float]], dense: dict[str, list[float]]) -> dict:
    """Milliseconds: median and min of every measure, all rounds, their spread ((max - min) / median, flagged
    ``noisy`` above NOISY_SPREAD), and the median per-round ratio to dense."""
    out = {}
    for k in TIMES:
        ms = [1000 * x for x in times[k]]
        median = statistics.median(ms)
        spread = (max(ms) - min(ms)) / median if median else float("inf")
        out.update({f"{k}_ms": median, f"{k}_ms_min": min(ms), f"{k}_ms_all": ms, f"{k}_spread": spread,
                    f"{k}_noisy": spread > NOISY_SPREAD,
                    f"{k}_ratio": statistics.median(p / d for p, d in zip(times[k], dense[k]))})
    return out


def _ms(r: dict, key: str, digits: int) -> str:
    """A median time, with ``†`` when its rounds were noisy."""
    return f"{r[key + '_ms']:.{digits}f}" + (" †" if r.get(key + "_noisy") else "")


def rss_child(path: str, prompt_tokens: int, new_tokens: int) -> None:
    """Run in a fresh process: peak RSS above the pre-load state while loading ``path`` and running it."""
    import psutil

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = psutil.Process().memory_info().rss
    model = load_model(path)
    loaded = psutil.Process().memory_info().rss
    prompt = fixed_prompt(model.get_input_embeddings().num_embeddings, prompt_tokens)
    time_once(model, prompt, new_tokens)
    peak = peak_rss()
    print(json.dumps({"rss_load_mb": (loaded - base) / 2**20, "rss_peak_mb": (peak - base) / 2**20}))


def measure_rss(path: Path, prompt_tokens: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory probe of {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibration_texts(tasks: list[str], n: int, workdir: Path) -> dict[str, list[str]]:
    from diet.tasks import load_task, prepare_task, read_prepared

    texts = {}
    for name in tasks:
        prepare_task(load_task(name, ROOT / "data" / "tasks"), workdir / name, n_samples=n, seed=0,
                     eval_limit=1, eval_seed=0)
        texts[name] = [r["text"] for r in read_prepared(workdir / name, "calib")[0]]
    return texts


def width_ranges(mask_summary: dict) -> dict[str, tuple[int, int]]:
    """``{group: (narrowest, widest)}`` of a mask summary (``results/pruned/summary.json``'s ``mask``)."""
    return {g: (int(s["width_min"]), int(s["width_max"])) for g, s in (mask_summary.get("groups") or {}).items()}


def experiment_variants(repo: Path, patterns: list[str], workdir: Path) -> list[dict]:
    """One variant per finished DVC experiment matching ``patterns``: its pruned checkpoint, fetched from the
    DVC cache at the experiment's commit into ``workdir``, named by method and pruned groups."""
    from dvc.api import DVCFileSystem

    from flows.experiments import PRUNED_METRICS, finished_runs, params_at
    from flows.points import row_label

    variants = []
    for run in finished_runs(repo, patterns):
        point, summary = run["point"], json.loads(run["read"](PRUNED_METRICS))
        groups = (params_at(run["read"]).get("prune") or {}).get("groups")
        path = workdir / run["experiment"]
        DVCFileSystem(str(repo), rev=run["rev"]).get("models/pruned", str(path), recursive=True)
        mask = summary.get("mask") or {}
        variants.append({"name": row_label(point.method, point.recover, groups), "sparsity": point.sparsity,
                         "layout": mask.get("layout", "-"), "model": load_model(path), "path": path,
                         "achieved_sparsity": mask.get("achieved_sparsity"), "widths": width_ranges(mask),
                         "experiment": run["experiment"]})
    return variants


def build_variants(base: Path, args, workdir: Path) -> list[dict]:
    """Dense plus one pruned model per (sparsity, layout), each saved under ``workdir`` for the memory probe."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    dense = load_model(base)
    texts = calibration_texts(args.tasks, args.n_calib, workdir / "tasks")
    score_cfg = ScoreConfig(groups=("mlp",))
    t0 = time.perf_counter()
    scores = {t: api.score(dense, tokenizer, x, score_cfg, progress=False)[0] for t, x in texts.items()}
    print(f"scored {len(texts)} tasks x {args.n_calib} samples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    geo = api.geometry(dense, ("mlp",))
    variants = [{"name": "dense", "sparsity": 0.0, "layout": "-", "model": dense, "path": base}]
    for sparsity in args.sparsities:
        for layout in args.layouts:
            _, mask = api.plan(scores, geo, merge_cfg=MergeConfig(), prune_cfg=PruneConfig(sparsity, ("mlp",)),
                               select_cfg=SelectConfig(layout=layout))
            model = api.apply(load_model(base), mask, layout)
            name = f"{layout} {sparsity:g}"
            path = save_pruned(model, tokenizer, workdir / name.replace(" ", "_"), {"mask": mask.summary()})
            widths = mask.widths["mlp"]
            variants.append({"name": name, "sparsity": sparsity, "layout": layout, "model": model, "path": path,
                             "achieved_sparsity": mask.sparsity, "widths": {"mlp": (min(widths), max(widths))}})
    return variants


def run(args) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="diet-bench-") as tmp:
        tmp = Path(tmp)
        base = Path(args.model) if args.model else None
        if base is None:
            from diet.model_sources import materialise

            base = tmp / "base"
            materialise("smollm2", base)
        if args.experiments:
            variants = [{"name": "dense", "sparsity": 0.0, "layout": "-", "model": load_model(base), "path": base},
                        *experiment_variants(Path(args.repo), args.experiments, tmp)]
        else:
            variants = build_variants(base, args, tmp)
        vocab = variants[0]["model"].get_input_embeddings().num_embeddings
        prompt = fixed_prompt(vocab, args.prompt_tokens)                        # (1, P)
        for v in variants:  # warm-up: first calls allocate and pick kernels
            time_once(v["model"], prompt[:, :16], 2)
            v["times"] = {k: [] for k in TIMES}
        for r in range(args.repeats):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                for k, x in time_once(v["model"], prompt, args.new_tokens).items():
                    v["times"][k].append(x)
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
        for v in variants:
            v.update(measure_rss(v["path"], args.prompt_tokens, args.new_tokens))

    dense = variants[0]
    rows = []
    for v in variants:
        counts = parameter_counts(v["model"])
        rows.append({
            "name": v["name"], "layout": v["layout"], "target_sparsity": v["sparsity"],
            "achieved_sparsity": v.get("achieved_sparsity", 0.0), "widths": v.get("widths", {}),
            **({"experiment": v["experiment"]} if "experiment" in v else {}),
            "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
            "params_decoder": counts["decoder"], "param_bytes": parameter_bytes(v["model"]),
            **timing_summary(v["times"], dense["times"]),
            "rss_load_mb": v["rss_load_mb"], "rss_peak_mb": v["rss_peak_mb"],
        })
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "settings": {"model": str(args.model or "smollm2 (materialised)"), "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "masks": f"the pruned checkpoints of experiments {', '.join(args.experiments)}"
                     if args.experiments else
                     f"diet vote (mlp group) of {', '.join(args.tasks)} x {args.n_calib} calibration samples",
                     "select": {"min_keep": SelectConfig().min_keep, "multiple": SelectConfig().multiple}},
        "variants": rows,
    }


def markdown(result: dict) -> str:
    lines = ["| variant | achieved sparsity | widths min-max | params total (M) | decoder (M) | param MB "
             "| peak RSS MB | prefill CPU ms | ratio | prefill wall ms (min) | ms/token CPU | ratio "
             "| ms/token wall (min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["variants"]:
        widths = ", ".join(f"{g} {lo}-{hi}" if lo != hi else f"{g} {lo}" for g, (lo, hi) in r["widths"].items())
        lines.append(f"| {r['name']} | {r['achieved_sparsity']:.3f} | {widths or '-'} "
                     f"| {r['params_total'] / 1e6:.1f} | {r['params_decoder'] / 1e6:.1f} "
                     f"| {r['param_bytes'] / 2**20:.0f} | {r['rss_peak_mb']:.0f} "
                     f"| {_ms(r, 'prefill_cpu', 0)} | {r['prefill_cpu_ratio']:.2f} | {r['prefill_wall_ms_min']:.0f} "
                     f"| {_ms(r, 'decode_cpu', 1)} | {r['decode_cpu_ratio']:.2f} | {r['decode_wall_ms_min']:.1f} |")
    lines += ["", f"Times are medians over rounds; † marks a measure whose rounds spread by more than "
                  f"{NOISY_SPREAD:.0%} of the median (a busy machine): compare its ratio, not its time."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("DIET_BASE_MODEL"),
                   help="materialised base model folder (default: $DIET_BASE_MODEL, else materialise smollm2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--layouts", nargs="+", default=["global", "uniform"], choices=LAYOUTS.names())
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa"])
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--experiments", nargs="+", metavar="PATTERN",
                   help="time the pruned checkpoints of the finished DVC experiments whose names match (shell-style) "
                        "instead of building variants")
    p.add_argument("--repo", default=str(ROOT),
                   help="with --experiments: the project that ran them (default: this one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.prompt_tokens, args.new_tokens)
        return
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
