"""Cost of the two evaluation backends on the same items: lm-evaluation-harness against the direct scorer.

    OMP_NUM_THREADS=1 python benchmarks/evaluation.py --model models/base --data data/tasks --limit 30

For every task in ``--tasks``, both backends (``diet.evaluation.harness.evaluate_tasks`` and
``diet.evaluation.loglik.evaluate_tasks_direct``) score the first ``--limit`` prepared evaluation items, in
alternation for ``--repeats`` rounds, after one warm-up of each (lm-eval and transformers import lazily on
first use). Times are the process's CPU time (with one thread, the work done), wall clock beside them; the
ratio is direct / lm-eval within a round, median over rounds. The script also counts the tokens each backend
feeds the model (lm-eval: context + continuation per choice, one-token choices of one context once; direct:
each shared context once) and checks that both give the same per-item predictions.

Writes ``benchmarks/results/evaluation.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diet.evaluation.data import load_eval_task  # noqa: E402
from diet.evaluation.loglik import build_items, encode_pair  # noqa: E402
from diet.tokens import resolve_add_bos  # noqa: E402
from diet.io import write_json  # noqa: E402
from diet.checkpoint import load_model  # noqa: E402
from diet.registry import EVAL_BACKENDS  # noqa: E402

DEFAULT_TASKS = "arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande,rte"


def token_counts(model, tokenizer, data_dir: Path, limit: int) -> tuple[int, int]:
    """(tokens lm-eval feeds the model, tokens the direct scorer feeds it) for one task's items."""
    add_bos = resolve_add_bos(model, tokenizer, None)
    harness = direct = 0
    for item in build_items(load_eval_task(data_dir.name, data_dir, limit=limit)):
        pairs = [encode_pair(tokenizer, c, x, add_bos) for c, x in zip(item.contexts, item.continuations)]
        one_context = len({tuple(c) for c, _ in pairs}) == 1
        if one_context and all(len(x) == 1 for _, x in pairs):
            harness += len(pairs[0][0])                # lm-eval runs a shared context of 1-token choices once
        else:
            harness += sum(len(c) + len(x) - 1 for c, x in pairs)
        if one_context:
            direct += len(pairs[0][0]) + sum(len(x) - 1 for _, x in pairs)
        else:
            direct += sum(len(c) + len(x) - 1 for c, x in pairs)
    return harness, direct


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def run(args) -> dict:
    from transformers import AutoTokenizer

    model = load_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    backends = {name: EVAL_BACKENDS.get(name) for name in ("lm_eval", "direct")}
    warm = {tasks[0]: args.data / tasks[0]}
    for fn in backends.values():
        fn(model, tokenizer, warm, batch_size=args.batch_size, limit=2)
    rows = []
    for task in tasks:
        one = {task: args.data / task}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
        results = {}
        for _ in range(args.repeats):
            for name, fn in backends.items():
                cpu, wall, out = _timed(lambda: fn(model, tokenizer, one, batch_size=args.batch_size,
                                                   limit=args.limit))
                times[name].append((cpu, wall))
                results[name] = out[task]
        same = [(r1["acc"], r1["acc_norm"]) == (r2["acc"], r2["acc_norm"])
                for r1, r2 in zip(results["lm_eval"]["items"], results["direct"]["items"])]
        harness_tokens, direct_tokens = token_counts(model, tokenizer, args.data / task, args.limit)
        ratios = [d[0] / h[0] for d, h in zip(times["direct"], times["lm_eval"])]
        rows.append({
            "task": task, "items": results["direct"]["n"],
            "tokens_lm_eval": harness_tokens, "tokens_direct": direct_tokens,
            "cpu_s_lm_eval": statistics.median(c for c, _ in times["lm_eval"]),
            "cpu_s_direct": statistics.median(c for c, _ in times["direct"]),
            "wall_s_lm_eval": min(w for _, w in times["lm_eval"]),
            "wall_s_direct": min(w for _, w in times["direct"]),
            "ratio_cpu": statistics.median(ratios),
            "same_acc_items": sum(same), "n_items": len(same),
            "acc": {name: res["acc"] for name, res in results.items()},
        })
        print(f"{task}: lm_eval {rows[-1]['cpu_s_lm_eval']:.1f}s  direct {rows[-1]['cpu_s_direct']:.1f}s  "
              f"ratio {rows[-1]['ratio_cpu']:.2f}", flush=True)
    total = {k: sum(r[k] for r in rows) for k in ("tokens_lm_eval", "tokens_direct", "cpu_s_lm_eval",
                                                 "cpu_s_direct", "same_acc_items", "n_items")}
    return {"model": str(args.model), "limit": args.limit, "batch_size": args.batch_size, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "tasks": rows, "total": total}


def markdown(result: dict) -> str:
    lines = ["| task | items | tokens lm-eval | tokens direct | CPU s lm-eval | CPU s direct | direct / lm-eval "
             "| same acc, acc_norm |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["tasks"]:
        lines.append(f"| {r['task']} | {r['items']} | {r['tokens_lm_eval']} | {r['tokens_direct']} | "
                     f"{r['cpu_s_lm_eval']:.1f} | {r['cpu_s_direct']:.1f} | {r['ratio_cpu']:.2f} | "
                     f"{r['same_acc_items']}/{r['n_items']} |")
    t = result["total"]
    lines.append(f"| **all** | | {t['tokens_lm_eval']} | {t['tokens_direct']} | {t['cpu_s_lm_eval']:.1f} | "
                 f"{t['cpu_s_direct']:.1f} | {t['cpu_s_direct'] / t['cpu_s_lm_eval']:.2f} | "
                 f"{t['same_acc_items']}/{t['n_items']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=os.environ.get("DIET_BASE_MODEL"),
                   help="a materialised base model folder (default: $DIET_BASE_MODEL)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "tasks", help="prepared task folders")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated (default: the eight default tasks)")
    p.add_argument("--limit", type=int, default=30, help="evaluation items per task (default: 30)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="rounds of both backends (default: 2)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluation.json")
    args = p.parse_args(argv)
    if args.model is None:
        raise SystemExit("pass --model DIR (a materialised base model folder) or set DIET_BASE_MODEL")
    for task in args.tasks.split(","):
        if not (args.data / task / "eval.jsonl").exists():
            raise SystemExit(f"no prepared evaluation items at {args.data / task}: run `dvc repro prepare@{task}`")
    result = run(args)
    write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
