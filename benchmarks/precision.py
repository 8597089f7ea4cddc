"""Scores and the mask on another device or dtype, against the pipeline's own (score files from `dvc repro`).

    OMP_NUM_THREADS=1 python benchmarks/precision.py --dtype bfloat16 --precision model    # bfloat16 here
    python benchmarks/precision.py --device cuda --dtype bfloat16 --precision model       # on a GPU
    python benchmarks/precision.py --device cuda --dtype float32 --precision model        # float32 on a GPU

The pipeline's score files (``scores/<task>.safetensors``, written by ``score@<task>`` with params.yaml's
settings: ``score.precision: model``, the model's dtype, by default) are the reference. This script scores the
same calibration texts (``data/tasks/<task>/calib.jsonl``) of the same model (``models/base``) with
``--device``, ``--dtype`` and ``--precision`` (everything else from params.yaml), then:

1. per task and group, how far the scores are from the reference: the median and the 99th percentile of the
   relative difference over all dimensions, and how far a dimension's rank within its layer moved (mean and
   largest shift, in positions out of the layer's width);
2. the mask params.yaml asks for (``merge``, ``prune``, ``select``: the same ``diet.api.plan`` as the merge
   and select stages) from both sets of scores: kept widths, and per group how many kept dimensions the two
   masks share and how many each keeps alone.

Run ``dvc repro`` first (the score files and the model must be there). Writes ``--out`` (JSON, default
``benchmarks/results/precision-<device type>-<dtype>-<precision>.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diet import api  # noqa: E402
from diet.config import DTYPES, PRECISIONS, load_params  # noqa: E402
from diet.errors import DietError  # noqa: E402
from diet.io import write_json  # noqa: E402
from diet.checkpoint import load_model_and_tokenizer  # noqa: E402
from diet.scorefile import model_fingerprint, read_scores, split_scores  # noqa: E402
from diet.tasks import read_calibration  # noqa: E402


def compare_scores(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """How far ``got`` (L, W) is from ``ref`` (L, W): relative differences and moved within-layer ranks."""
    rel = ((got.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-12)).flatten()
    rank = lambda t: torch.argsort(torch.argsort(t.double(), dim=1, stable=True), dim=1)  # noqa: E731
    shift = (rank(ref) - rank(got)).abs().double()                                       # (L, W) positions
    return {"rel_median": rel.median().item(), "rel_p99": rel.quantile(0.99).item(), "rel_max": rel.max().item(),
            "rank_shift_mean": shift.mean().item(), "rank_shift_max": int(shift.max().item()),
            "width": int(ref.shape[1])}


def compare_masks(ref, got) -> dict:
    """Per group: kept dimensions in both masks, in one only, and the kept widths of each."""
    out = {}
    for group, ref_keep in ref.keep_tensors().items():
        got_keep = got.keep_tensors()[group]
        both = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref_keep, got_keep))
        kept_ref, kept_got = sum(len(a) for a in ref_keep), sum(len(b) for b in got_keep)
        out[group] = {"kept_reference": kept_ref, "kept_here": kept_got, "kept_both": both,
                      "reference_only": kept_ref - both, "here_only": kept_got - both,
                      "same_share": both / max(kept_ref, 1),
                      "widths_reference": ref.widths[group], "widths_here": got.widths[group]}
    return out


def run(args) -> dict:
    params = load_params(args.params)
    score_cfg = dataclasses.replace(params.score, precision=args.precision)
    model_dir, scores_dir = Path(args.model), Path(args.scores)
    fingerprint = model_fingerprint(model_dir)
    tasks = args.tasks or list(params.tasks)
    missing = [t for t in tasks if not (scores_dir / f"{t}.safetensors").exists()]
    if missing:
        raise DietError(f"no score file for {', '.join(missing)} in {scores_dir}", "run `dvc repro` first")
    model, tokenizer = load_model_and_tokenizer(model_dir, args.dtype, args.device)
    device = str(next(model.parameters()).device)
    reference, here, per_task, seconds = {}, {}, {}, {}
    for task in tasks:
        reference[task] = read_scores(scores_dir / f"{task}.safetensors", expect_fingerprint=fingerprint)[0]
        texts = read_calibration(Path(args.data) / task / "calib.jsonl", task)
        start = time.perf_counter()
        tensors, _ = api.score(model, tokenizer, texts, score_cfg, max_length=params.calibration.max_length,
                               progress=False)
        seconds[task] = time.perf_counter() - start
        here[task] = split_scores(tensors)[0]
        per_task[task] = {g: compare_scores(reference[task][g], here[task][g]) for g in reference[task]}
        print(f"{task}: scored {len(texts)} texts in {seconds[task]:.1f} s", file=sys.stderr)
    geo = api.geometry_from_folder(model_dir, groups=tuple(next(iter(reference.values())).keys()))
    masks = {}
    for name, scores in (("reference", reference), ("here", here)):
        _, masks[name] = api.plan(scores, geo, merge_cfg=params.merge, prune_cfg=params.prune,
                                  select_cfg=params.select)
    return {"device": device, "dtype": args.dtype, "precision": args.precision,
            "reference": {"scores": str(scores_dir), "score.precision": params.score.precision,
                          "model.dtype": params.model.dtype},
            "sparsity": params.prune.sparsity, "groups": list(params.prune.groups), "tasks": tasks,
            "scores": per_task, "masks": compare_masks(masks["reference"], masks["here"]),
            "scoring_seconds": seconds,
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}


def table(result: dict) -> str:
    lines = [f"Scores on {result['device']} in {result['dtype']} (precision {result['precision']}) against "
             f"{result['reference']['scores']} (score.precision {result['reference']['score.precision']})", "",
             "| task | group | median rel. diff | p99 rel. diff | rank shift in the layer: mean / max (of width) |",
             "|---|---|---:|---:|---:|"]
    for task, groups in result["scores"].items():
        for group, c in groups.items():
            lines.append(f"| {task} | {group} | {c['rel_median']:.2e} | {c['rel_p99']:.2e} | "
                         f"{c['rank_shift_mean']:.2f} / {c['rank_shift_max']} (of {c['width']}) |")
    lines += ["", f"Mask at sparsity {result['sparsity']} ({'+'.join(result['groups'])}):", "",
              "| group | kept (reference) | kept (here) | kept by both | same share |", "|---|---:|---:|---:|---:|"]
    for group, m in result["masks"].items():
        lines.append(f"| {group} | {m['kept_reference']} | {m['kept_here']} | {m['kept_both']} | "
                     f"{m['same_share']:.2%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | gpus (as model.device)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--precision", default="model", choices=PRECISIONS, help="as score.precision (default: model)")
    p.add_argument("--tasks", nargs="+", help="default: params.yaml's tasks")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--model", default=str(ROOT / "models" / "base"))
    p.add_argument("--scores", default=str(ROOT / "scores"))
    p.add_argument("--data", default=str(ROOT / "data" / "tasks"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        result = run(args)
    except DietError as e:
        print(f"error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"precision-{torch.device(result['device']).type}-{args.dtype}-{args.precision}.json")
    write_json(out, result)
    text = table(result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
