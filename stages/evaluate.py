"""DVC stages `evaluate_dense@{task}` / `evaluate@{task}`: zero-shot accuracy of one model on one task.

Writes ``--out`` (JSON): acc / acc_norm with standard errors, the item count, the backend, and per-item
results (``items``: id, label, log-likelihood per choice, acc, acc_norm) that paired comparisons use. Each
task is its own stage instance, so adding a task evaluates that task alone, and the dense model's evaluation
of a task is computed once.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from diet.registry import EVAL_BACKENDS
from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.evaluate")


def main(args, params) -> None:
    set_threads()
    from diet.io import check_writable

    check_writable(args.out)  # before the model is loaded, not after the work
    from diet.checkpoint import load_model_and_tokenizer
    from diet.evaluation import load_eval_task
    from diet.io import write_json
    from diet.versions import EVALUATE

    cfg = params.evaluate
    task = load_eval_task(args.task, args.data)           # checked before the model loads
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    log.info("loaded %s in %.1fs", args.model, time.perf_counter() - start)
    backend = args.backend or cfg.backend
    evaluate_tasks = EVAL_BACKENDS.get(backend)
    result = evaluate_tasks(model, tokenizer, {task.name: args.data}, batch_size=cfg.batch_size)[task.name]
    write_json(args.out, {"task": task.name, "model": str(args.model), "backend": backend,
                          "evaluate_version": EVALUATE, **result})


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="saved model folder (models/base or models/pruned)")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--data", required=True, type=Path, help="the task's prepared folder (data/tasks/<task>)")
    p.add_argument("--out", required=True, type=Path, help="results JSON, e.g. results/pruned/tasks/<task>.json")
    p.add_argument("--backend", choices=EVAL_BACKENDS.names(), default=None,
                   help="override evaluate.backend: " + " or ".join(f"{n} ({b.summary})" for n, b in EVAL_BACKENDS.items()))
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
