"""DVC stages `perplexity_dense` / `perplexity`: held-out perplexity and size of one model.

Writes ``--out`` (JSON): perplexity on held-out passages (with its token count), parameter counts (total,
embedding, non-embedding, decoder, per layer) and the bytes of the checkpoint's weight files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, set_threads, stage_parser

log = logging.getLogger("diet.perplexity")


def checkpoint_size(model_dir: Path) -> dict:
    """Bytes of the weight files of a saved model folder."""
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern))
    size = sum(p.stat().st_size for p in files)
    return {"weights_bytes": size, "weights_mb": round(size / 2**20, 3), "files": len(files)}


def main(args, params) -> None:
    set_threads()
    from diet.io import check_writable

    check_writable(args.out)  # before the model is loaded, not after the work
    from diet.checkpoint import load_model_and_tokenizer
    from diet.evaluation.perplexity import heldout_perplexity
    from diet.io import write_json
    from diet.geometry import parameter_counts
    from diet.versions import PERPLEXITY

    cfg = params.evaluate
    model, tokenizer = load_model_and_tokenizer(args.model, params.model.dtype, params.model.device)
    ppl = None
    if cfg.perplexity_docs:
        log.info("perplexity on %d held-out passages", cfg.perplexity_docs)
        ppl = heldout_perplexity(model, tokenizer, n_docs=cfg.perplexity_docs,
                                 max_length=cfg.perplexity_max_length, batch_size=cfg.batch_size)
        log.info("perplexity %.3f over %d tokens", ppl["ppl"], ppl["tokens"])
    write_json(args.out, {"model": str(args.model), "perplexity": ppl, "params": parameter_counts(model),
                          "checkpoint": checkpoint_size(Path(args.model)), "perplexity_version": PERPLEXITY})


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--model", required=True, help="saved model folder (models/base or models/pruned)")
    p.add_argument("--out", required=True, type=Path, help="JSON, e.g. results/pruned/model.json")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
