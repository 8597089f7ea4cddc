"""DVC stage `prepare@{task}`: seeded calibration and evaluation sets for one task.

A task's source files must not lie inside any output of the pipeline: DVC empties an output before the stage
that writes it runs. The check runs first, against every output DVC knows (and this stage's ``--out``), and
the stage's output is declared ``persist`` in dvc.yaml, so a refused task loses nothing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, stage_parser

log = logging.getLogger("diet.prepare")


def pipeline_outputs(root: Path = Path(".")) -> list[Path]:
    """Every output path of the DVC pipeline in ``root`` (none outside a DVC project)."""
    if not (root / "dvc.yaml").is_file():
        return []
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [Path(out.fs_path) for out in repo.index.outs]


def main(args, params) -> None:
    from diet.tasks import load_task, prepare_task
    from diet.tasks.spec import check_outside

    spec = load_task(args.task, args.task_dir)
    check_outside(spec, [Path(args.out), *pipeline_outputs()])
    meta = prepare_task(spec, args.out, n_samples=params.calibration.n_samples, seed=params.calibration.seed,
                        eval_limit=params.evaluate.limit, eval_seed=params.evaluate.seed)
    log.info("%s: %d calibration rows (%s), %d evaluation rows (%s of %d) -> %s", spec.name, meta["n_calib"],
             meta["calib_split"], meta["n_eval"], meta["eval_split"], meta["n_eval_available"], args.out)


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--task", required=True, help="task name (a file data/tasks/<task>.yaml)")
    p.add_argument("--task-dir", default="data/tasks", type=Path, help="folder of task files")
    p.add_argument("--out", required=True, help="output folder, e.g. data/tasks/<task>")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
