"""DVC stage `report`: the per-task evaluations and model figures of the dense and pruned models -> metrics.

Reads the task list from params (never the folder: a removed task's file may linger), every
``results/{dense,pruned}/tasks/<task>.json`` and ``results/{dense,pruned}/model.json``, and the mask. Writes

* ``metrics/dense.json``, ``metrics/pruned.json``: the few figures ``dvc metrics show`` prints (mean acc,
  acc_norm, perplexity, parameters, sparsity; for the pruned model the mean flip rate and KL to the dense one);
* ``metrics/tasks.json``: per task, the pruned and dense acc, the flip rate, KL and the number of items (a
  second file, so that the summary stays narrow);
* ``results/dense/summary.json``, ``results/pruned/summary.json``: the whole record of each model (per task,
  mean, perplexity, parameter counts, checkpoint size, mask summary; for the pruned model its paired
  differences from the dense model, its perplexity minus the dense one's with a paired interval over passages,
  and its fidelity to it: flip rates and KL, ``diet.evaluation.fidelity``);
* ``results/table.md``: per-task accuracy with standard errors, beside the dense model's, and model figures.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, stage_parser

log = logging.getLogger("diet.report")


def _read(path: Path, artifact: str):
    from diet.errors import DataError
    from diet.io import read_json

    if not path.is_file():
        raise DataError(f"evaluation result missing: {path}", "run the evaluation that writes it", artifact=artifact)
    return read_json(path)


def main(args, params) -> None:
    from diet.evaluation.fidelity import fidelity
    from diet.evaluation.report import (markdown_table, model_record, paired_differences, perplexity_vs, short_metrics,
                                        task_metrics)
    from diet.io import read_json, write_json, write_text

    mask = read_json(args.mask) if args.mask.is_file() else {}
    mask_summary = mask.get("summary") or {}
    records, results = {}, {}
    for kind, prefix, method in (("dense", "dense_", "dense"), ("pruned", "", params.merge.method)):
        folder = args.results / kind
        tasks = {t: _read(folder / "tasks" / f"{t}.json", f"{prefix}evaluation:{t}") for t in params.tasks}
        results[kind] = tasks
        stats = _read(folder / "model.json", f"{prefix}perplexity")
        backends = sorted({r.get("backend") for r in tasks.values()})
        records[kind] = model_record(tasks, stats, method=method, backend=",".join(map(str, backends)),
                                     sparsity=mask_summary.get("achieved_sparsity") if kind == "pruned" else 0.0,
                                     mask=mask_summary if kind == "pruned" else None)
    records["pruned"]["vs_dense"] = paired_differences(results["dense"], results["pruned"])
    records["pruned"]["fidelity"] = fidelity(results["dense"], results["pruned"])
    records["pruned"]["perplexity_vs_dense"] = perplexity_vs(records["dense"], records["pruned"])
    for kind, record in records.items():
        write_json(args.results / kind / "summary.json", record)
        write_json(args.out / f"{kind}.json", short_metrics(record))
    write_json(args.out / "tasks.json", task_metrics(records["pruned"], records["dense"]))
    write_text(args.results / "table.md", markdown_table(records["pruned"], records["dense"]))
    log.info("mean acc dense %s, pruned %s -> %s", records["dense"]["mean"]["acc"], records["pruned"]["mean"]["acc"],
             args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--results", default="results", type=Path, help="folder with dense/ and pruned/ results")
    p.add_argument("--mask", default="masks/mask.json", type=Path, help="the pruned model's mask")
    p.add_argument("--out", default="metrics", type=Path, help="folder for dense.json and pruned.json")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
