"""DVC stage `check`: params.yaml and the task files, validated before any other stage runs.

DVC empties a stage's outputs before it runs the stage, so a value that the stage would refuse (``prune.sparsity:
2``, an unknown key, a task whose file is missing) used to cost the output it replaced. This stage sits at the
root of the graph (``model`` and every ``prepare@`` depend on its output) and depends on params.yaml as a file:
any edit reruns it first, and a refusal stops ``dvc repro`` before any output is touched. Its output is the
same bytes whatever the params are, so a valid edit reruns nothing downstream that does not read what changed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages._common import run_stage, stage_parser

log = logging.getLogger("diet.check")

#: what the stage writes when the params are valid: constant, so that downstream stages see no change
CHECKED = '{"params": "valid"}\n'


def main(args, params) -> None:
    from diet.io import write_text
    from diet.tasks.spec import check_outside, load_task
    from stages.prepare import pipeline_outputs

    outputs = pipeline_outputs()
    for task in params.tasks:
        check_outside(load_task(task, args.task_dir), outputs)
    write_text(Path(args.out), CHECKED)
    log.info("%s and %d task files are valid", args.params, len(params.tasks))


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--task-dir", default="data/tasks", type=Path, help="folder of task files")
    p.add_argument("--out", default="data/params.checked", help="output file (default: data/params.checked)")
    return p


if __name__ == "__main__":
    sys.exit(run_stage(main, parser()))
