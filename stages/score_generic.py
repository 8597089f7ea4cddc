"""DVC stage `score_generic`: importance scores of the base model on generic text (the task-agnostic baseline).

Same statistic, groups, batch size and sample count as the per-task `score` stages, but on passages tied to
no task (diet.generic), drawn with calibration.seed.
"""

from __future__ import annotations

import logging
import sys

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.score_generic")


def main(args, params) -> None:
    set_threads()
    from diet.io import check_writable

    check_writable(args.out)  # before the model is loaded, not after the work
    from diet.checkpoint import load_model_and_tokenizer
    from diet.generic import generic_source, generic_texts
    from diet.io import sha256_json
    from diet.scorefile import model_fingerprint, write_scores
    from diet.scoring import score
    from diet.versions import GENERIC

    cal, sc = params.calibration, params.score
    source, source_path = generic_source()
    texts = generic_texts(cal.n_samples, cal.seed)
    log.info("%d generic passages from %s (%s), seed %d", len(texts), source, source_path.name, cal.seed)

    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    scores, stats = score(model, tokenizer, texts, sc, max_length=cal.max_length)
    meta = {"model_fingerprint": model_fingerprint(args.model), "task": "generic", "generic_source": source,
            "task_data_hash": sha256_json(texts), "n_samples": stats["n_samples"], "n_tokens": stats["n_tokens"],
            "statistic": sc.statistic, "weight_norm": sc.weight_norm, "max_length": cal.max_length,
            "seed": cal.seed, "score_config": sha256_json(sc.__dict__),
            "generic_version": GENERIC}
    write_scores(args.out, scores, meta)
    log.info("scored %d samples (%d tokens) -> %s", stats["n_samples"], stats["n_tokens"], args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", default="models/base", help="saved base model folder")
    p.add_argument("--out", default="baselines/generic.safetensors", help="score file (+ .json beside it)")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
