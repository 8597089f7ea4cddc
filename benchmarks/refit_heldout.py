"""Held-out perplexity of the refit's settings on the pipeline's own mask, without evaluating any task.

    OMP_NUM_THREADS=1 python benchmarks/refit_heldout.py --runs none 0.1 0.3 1.0 obs:0.3

For each run: the base model (``models/base``), the mask of ``masks/mask.json`` (``dvc repro`` first; any pruned
groups), refitted
with ``diet.refit.refit_on_texts`` on the first ``--samples`` calibration samples of every prepared task
(``data/tasks/<task>/calib.jsonl``; ``none``: no refit; ``D``: damping D; ``obs:D``: damping D with the
refit-aware choice, priors from ``merged/votes.safetensors``), then pruned, and its perplexity measured on
held-out calibration text (samples ``--samples`` to ``2 * --samples - 16`` of each task, which the refit does not
see: the figure that picks a default; ``--heldout START`` fixes them to samples START.. of each task instead, so
that runs with different ``--samples`` below START compare on the same text) and on the held-out passages the
tables report (``--docs``). One JSON line per run.

    OMP_NUM_THREADS=1 python benchmarks/refit_heldout.py --runs obs:0.3 --samples 80 --heldout 84
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diet.evaluation.perplexity import heldout_perplexity, perplexity  # noqa: E402
from diet.checkpoint import load_model_and_tokenizer  # noqa: E402
from diet.pruning import apply_mask  # noqa: E402
from diet.refit import refit_on_texts  # noqa: E402
from diet.mask import Mask  # noqa: E402
from diet.select import read_priority  # noqa: E402
from diet.tasks import read_calibration  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["none", "0.3"])
    p.add_argument("--root", type=Path, default=ROOT, help="the DIET project after `dvc repro`")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--docs", type=int, default=50)
    p.add_argument("--heldout", type=int, default=None, metavar="START",
                   help="held-out calibration samples START.. of each task (default: --samples to 2 * --samples - 16)")
    args = p.parse_args(argv)
    if args.heldout is not None and args.heldout < args.samples:
        p.error(f"--heldout {args.heldout} would score samples the refit sees: give at least --samples {args.samples}")
    tasks_dir = args.root / "data" / "tasks"
    tasks = sorted(d.name for d in tasks_dir.iterdir() if (d / "calib.jsonl").is_file())
    mask = Mask.load(args.root / "masks" / "mask.json")
    calib = {t: read_calibration(tasks_dir / t / "calib.jsonl", t) for t in tasks}
    first, stop = (args.samples, 2 * args.samples - 16) if args.heldout is None else (args.heldout, None)
    held = [x for t in tasks for x in calib[t][first:stop]]
    for run in args.runs:
        model, tok = load_model_and_tokenizer(args.root / "models" / "base", "float32", "cpu")
        keep, start, record = mask.keep_tensors(), time.process_time(), {"run": run}
        if run != "none":
            choose, _, damping = run.rpartition(":")
            priors = read_priority(args.root / "merged" / "votes.safetensors", ["mlp"], mask.base_widths) \
                if choose == "obs" else None
            done, stats = refit_on_texts(model, tok, {t: calib[t][:args.samples] for t in tasks}, keep,
                                         damping=float(damping), priors=priors, progress=False)
            keep = done.keep
            summary = done.summary()
            record.update(tokens=stats["n_tokens"],
                          errors={g: {"none": round(v["error_none"], 4), "refit": round(v["error_refit"], 4)}
                                  for g, v in summary.items()},
                          channels_changed=sum(r.get("channels_changed", 0) for r in summary.get("mlp", {})
                                               .get("layers", [])))
        apply_mask(model, keep)
        record.update(samples=args.samples, heldout_from=first,
                      heldout_calibration_ppl=round(perplexity(model, tok, held, max_length=512,
                                                               progress=False)["ppl"], 3),
                      passages_ppl=round(heldout_perplexity(model, tok, n_docs=args.docs, max_length=512)["ppl"], 2),
                      cpu_s=round(time.process_time() - start))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
