"""Cost of the refit (``prune.recover: refit``, diet.refit) against a plain forward over the same calibration.

    OMP_NUM_THREADS=1 python benchmarks/refit.py --model models/base --tasks-dir data/tasks
    OMP_NUM_THREADS=1 python benchmarks/refit.py --shapes gemma2-2b --layers 2

For one model: calibration batches as the prune stage builds them (``--samples`` per task of the prepared tasks
under ``--tasks-dir``, or, with ``--shapes``, random token sequences of ``--length`` tokens for a random model of a
real model's layer shapes with ``--layers`` layers and a small vocabulary), a keep set that removes
``--sparsity`` of each layer's MLP channels (and, with ``--attention``, one KV group per layer; with ``--hidden``,
``--sparsity`` of the residual channels, whose refit solves for every projection reading the stream), then:

* ``plain_s``: the model's own forward over the same batches (CPU time, one thread as in the prune stage);
* ``refit_s``: ``diet.refit.refit`` (CPU time), and its ratio to the plain forward, per layer (the cost grows
  with the layer count: extrapolate a full model from ``per_layer_s``);
* ``peak_mib``: the peak resident memory above the loaded model while the refit runs (VmHWM, reset first);
* ``gram_mib``: the largest float64 Gram matrix one solve needs (``K x K``, ``K`` kept channels of its input);
* the mean relative calibration error with the dense columns kept (``none``) and after the refit.

Appends one record per run to ``benchmarks/results/refit.json`` (keyed by the model) and prints it as markdown.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.scoring import peak_above_now  # noqa: E402
from diet.adapters import get_adapter  # noqa: E402
from diet.groups import GROUPS  # noqa: E402
from diet.io import read_json, write_json  # noqa: E402
from diet.refit import calibration_batches, refit  # noqa: E402

#: layer shapes of real models (hidden, intermediate, heads, KV heads, head_dim) for ``--shapes``
SHAPES = {
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64),
}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def real_model(args):
    from diet.checkpoint import load_model_and_tokenizer
    from diet.scoring import encode_texts
    from diet.tasks import read_calibration
    from diet.tokens import resolve_add_bos

    model, tokenizer = load_model_and_tokenizer(args.model, "float32", "cpu")
    tasks = sorted(p.name for p in Path(args.tasks_dir).iterdir() if (p / "calib.jsonl").is_file())
    if not tasks:
        raise SystemExit(f"no prepared tasks under {args.tasks_dir}: run `dvc repro` (the prepare@ stages) first")
    add_bos = resolve_add_bos(model, tokenizer)
    sources = {t: encode_texts(tokenizer, read_calibration(Path(args.tasks_dir) / t / "calib.jsonl", t)[:args.samples],
                               max_length=args.max_length, add_bos=add_bos) for t in tasks}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return str(args.model), model, sources, pad


def random_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[args.shapes])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, num_hidden_layers=args.layers, vocab_size=4096,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 4096, (args.length,), generator=g).tolist() for _ in range(args.samples)]
    return f"random {args.shapes} shapes, {args.layers} layers", model, {"random": seqs}, 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    p.add_argument("--tasks-dir", type=Path, default=ROOT / "data" / "tasks")
    p.add_argument("--shapes", choices=sorted(SHAPES), help="a random model of these layer shapes instead")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=32, help="samples per task (prune.refit_samples)")
    p.add_argument("--length", type=int, default=128, help="tokens per random sample (--shapes)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--attention", action="store_true", help="also remove one KV group per layer")
    p.add_argument("--hidden", action="store_true", help="also remove --sparsity of the residual channels")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "refit.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    name, model, sources, pad = random_model(args) if args.shapes else real_model(args)
    batches = calibration_batches(sources, weights=None, batch_size=args.batch_size, pad_id=pad)
    adapter = get_adapter(model)
    widths = GROUPS["mlp"].widths(adapter)
    g = torch.Generator().manual_seed(1)
    keep = {"mlp": [torch.randperm(w, generator=g)[:round(w * (1 - args.sparsity))].sort().values for w in widths]}
    if args.attention:
        keep["attention"] = [torch.arange(1, adapter.num_kv_heads(i)) for i in range(adapter.num_layers)]
    if args.hidden:
        width = adapter.hidden_size()
        keep["hidden"] = [torch.randperm(width, generator=g)[:round(width * (1 - args.sparsity))].sort().values]
    tokens = sum(int(b.mask.sum()) for b in batches)

    with torch.no_grad():
        model(input_ids=batches[0].ids)                   # warm-up: weights touched, kernels loaded
        start = cpu_seconds()
        for b in batches:
            model(input_ids=b.ids, use_cache=False)
        plain = cpu_seconds() - start
    t0, w0 = cpu_seconds(), time.perf_counter()
    peak, done = peak_above_now(lambda: refit(model, keep, batches, progress=False))
    report = done.report
    refit_s, wall = cpu_seconds() - t0, time.perf_counter() - w0
    k = max(int(v.numel()) for grp in ("mlp", "hidden") for v in keep.get(grp, []))
    errors = {grp: {"none": sum(r["error_none"] for r in rows) / len(rows),
                    "refit": sum(min(r["error_none"], r["error_refit"]) for r in rows) / len(rows)}
              for grp, rows in report.items()}
    record = {"model": name, "layers": adapter.num_layers, "samples": sum(len(s) for s in sources.values()),
              "tokens": tokens, "groups": sorted(keep), "sparsity": args.sparsity, "plain_s": round(plain, 2),
              "refit_s": round(refit_s, 2), "refit_wall_s": round(wall, 2),
              "per_layer_s": round(refit_s / adapter.num_layers, 2), "ratio": round(refit_s / plain, 2),
              "peak_mib": round(peak), "gram_mib": round(k * k * 8 / 2 ** 20, 1), "errors": errors,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    results = read_json(args.out) if args.out.is_file() else {}
    results[f"{name} {'+'.join(sorted(keep))}"] = record
    write_json(args.out, results)
    print(json.dumps(record, indent=1))
    print("| model | layers | tokens | plain forward s | refit s | per layer s | ratio | peak MiB | Gram MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['model']} ({'+'.join(r['groups'])}) | {r['layers']} | {r['tokens']:,} | {r['plain_s']} | "
              f"{r['refit_s']} | {r['per_layer_s']} | {r['ratio']} | {r['peak_mib']} | {r['gram_mib']} |")


if __name__ == "__main__":
    main()
