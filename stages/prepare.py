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


#: how often, and how long apart, the outputs are read again while another DVC process rewrites dvc.lock
LOCK_READS, LOCK_WAIT_S = 20, 0.25


def pipeline_outputs(root: Path = Path(".")) -> list[Path]:
    """Every output path of the DVC pipeline in ``root`` (none outside a DVC project).

    Stages run side by side (``diet-flow run``), and DVC rewrites dvc.lock in place when one finishes, so a read
    can catch it half-written: such a read is tried again, and a lock file that still does not parse after
    about five seconds is a DietError naming it.
    """
    if not (root / "dvc.yaml").is_file():
        return []
    import time

    from dvc.repo import Repo
    from dvc.utils.strictyaml import YAMLSyntaxError, YAMLValidationError

    from diet.errors import DietError

    for attempt in range(LOCK_READS):
        try:
            with Repo(str(root)) as repo:
                return [Path(out.fs_path) for out in repo.index.outs]
        except (YAMLSyntaxError, YAMLValidationError) as e:
            if attempt == LOCK_READS - 1:
                raise DietError(f"the pipeline's files do not parse: {str(e).strip().splitlines()[0]}",
                                "restore dvc.lock (or dvc.yaml) from git, e.g. `git checkout dvc.lock`, then "
                                "rerun") from None
            time.sleep(LOCK_WAIT_S)
    raise AssertionError("unreachable")


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
