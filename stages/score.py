"""DVC stage `score@{task}`: per-dimension activation importance of the base model on one task."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.score")


def main(args, params) -> None:
    set_threads()
    from diet.io import check_writable

    check_writable(args.out)  # before the model is loaded, not after the work
    from diet.config import check_task_name
    from diet.io import sha256_file, sha256_json
    from diet.adapters import adapter_class
    from diet.checkpoint import load_model_and_tokenizer, read_config
    from diet.scorefile import model_fingerprint, write_scores
    from diet.scoring import score
    from diet.tasks import read_calibration

    texts = read_calibration(args.calib, check_task_name(args.task, "--task"))
    adapter_class(read_config(args.model).model_type).check_groups(params.score.groups, "score.groups")
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    scores, stats = score(model, tokenizer, texts, params.score, max_length=params.calibration.max_length)
    write_scores(args.out, scores, {
        "model_fingerprint": model_fingerprint(args.model), "task": args.task,
        "task_data_hash": sha256_file(args.calib), "n_samples": stats["n_samples"],
        "n_tokens": stats["n_tokens"], "statistic": params.score.statistic,
        "weight_norm": params.score.weight_norm, "max_length": params.calibration.max_length,
        "score_config": sha256_json(params.score.__dict__)})
    log.info("%s: scored %d samples (%d tokens) -> %s", args.task, stats["n_samples"], stats["n_tokens"], args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--task", required=True)
    p.add_argument("--model", default="models/base", type=Path)
    p.add_argument("--calib", required=True, type=Path,
                   help="prepared calibration samples (data/tasks/<task>/calib.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="scores/<task>.safetensors")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
