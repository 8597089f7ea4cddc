"""DVC stages `evaluate_dense` / `evaluate`: zero-shot accuracy, perplexity, size and speed of one model.

Writes ``--out`` (DVC metrics: per-task and mean acc / acc_norm, perplexity, parameter counts, latency,
checkpoint size, sparsity, method) and ``--details`` (per-item results per task, the full record, and a
markdown table, with deltas against ``--dense`` when given).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from stages._common import load_model_and_tokenizer, run_stage, set_threads, stage_parser

log = logging.getLogger("diet.evaluate")

SUMMARY_KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")


def checkpoint_size(model_dir: Path) -> dict:
    """Bytes of the weight files of a saved model folder."""
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern))
    size = sum(p.stat().st_size for p in files)
    return {"weights_bytes": size, "weights_mb": round(size / 2**20, 3), "files": len(files)}


def mask_summary(mask_path: Path) -> dict:
    from diet.io import read_json, sha256_file

    data = read_json(mask_path)
    summary = data.get("summary") or {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    return {**summary, "path": str(mask_path), "sha256": sha256_file(mask_path)}


def sparsity_of(params: dict, mask: dict | None, dense: dict | None) -> float:
    """Achieved share of decoder-layer parameters removed: the mask's figure, else the ratio to dense."""
    if mask is not None and isinstance(mask.get("achieved_sparsity"), (int, float)):
        return float(mask["achieved_sparsity"])
    dense_decoder = ((dense or {}).get("params") or {}).get("decoder")
    if dense_decoder:
        return 1.0 - params["decoder"] / dense_decoder
    return 0.0


def main(args, params) -> None:
    set_threads()
    from diet.errors import DataError
    from diet.evaluation.latency import measure_latency
    from diet.evaluation.perplexity import heldout_perplexity
    from diet.evaluation.report import markdown_table, mean_accuracy
    from diet.io import atomic_dir, read_json, write_json, write_jsonl
    from diet.pruning import parameter_counts

    cfg = params.evaluate
    model_dir, data_dir = Path(args.model), Path(args.data)
    dense = None
    if args.dense:
        if not Path(args.dense).is_file():
            raise DataError(f"dense metrics not found: {args.dense}", "run `dvc repro evaluate_dense` first")
        dense = read_json(args.dense)
    mask = mask_summary(Path(args.mask)) if args.mask else None

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir, params.model.dtype)
    log.info("loaded %s in %.1fs", model_dir, time.perf_counter() - start)

    tasks = {name: data_dir / name for name in params.tasks}
    backend = args.backend or cfg.backend
    if backend == "direct":
        from diet.evaluation.loglik import evaluate_tasks_direct as evaluate_tasks
    else:
        from diet.evaluation.harness import evaluate_tasks
    results = evaluate_tasks(model, tokenizer, tasks, batch_size=cfg.batch_size, limit=cfg.limit)

    ppl = None
    if cfg.perplexity_docs:
        log.info("perplexity on %d held-out passages", cfg.perplexity_docs)
        ppl = heldout_perplexity(model, tokenizer, n_docs=cfg.perplexity_docs,
                                 max_length=cfg.perplexity_max_length, batch_size=cfg.batch_size)
        log.info("perplexity %.3f over %d tokens", ppl["ppl"], ppl["tokens"])
    latency = {}
    if cfg.latency_tokens:
        latency = measure_latency(model, new_tokens=cfg.latency_tokens)
        log.info("prefill %.1f ms, decode %.2f ms/token", latency["prefill_ms"], latency["ms_per_token"])

    counts = parameter_counts(model)
    task_metrics = {name: {k: r[k] for k in SUMMARY_KEYS} for name, r in results.items()}
    metrics = {
        "tasks": task_metrics,
        "mean": mean_accuracy(task_metrics),
        "perplexity": ppl["ppl"] if ppl else None,
        "params": {k: v for k, v in counts.items() if k != "per_layer"},
        "latency": {k: latency[k] for k in ("prefill_ms", "ms_per_token") if k in latency},
        "checkpoint": checkpoint_size(model_dir),
        "sparsity": sparsity_of(counts, mask, dense),
        "method": params.merge.method if args.mask else "dense",
        "backend": backend,
    }
    record = {**metrics, "params": counts, "latency": latency, "perplexity_detail": ppl, "mask": mask,
              "model": str(model_dir), "evaluate": params.to_dict()["evaluate"]}
    with atomic_dir(args.details) as tmp:
        for name, r in results.items():
            write_jsonl(tmp / f"{name}.jsonl", r["items"])
        write_json(tmp / "summary.json", record)
        (tmp / "table.md").write_text(markdown_table(metrics, dense))
    write_json(args.out, metrics)
    log.info("mean acc %s, acc_norm %s -> %s", metrics["mean"]["acc"], metrics["mean"]["acc_norm"], args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="saved model folder (models/base or models/pruned)")
    p.add_argument("--data", default="data/tasks", help="folder of prepared tasks, one sub-folder per task")
    p.add_argument("--out", required=True, help="metrics JSON, e.g. metrics/pruned.json")
    p.add_argument("--details", required=True, help="folder for per-task results and table.md")
    p.add_argument("--mask", help="masks/mask.json of a pruned model (adds its summary)")
    p.add_argument("--dense", help="the dense model's metrics JSON (adds deltas to the table)")
    p.add_argument("--backend", choices=("lm_eval", "direct"), default=None,
                   help="override evaluate.backend: lm_eval (reference) or direct (the same log-likelihood "
                        "scoring without lm-eval, each context run once; faster)")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
