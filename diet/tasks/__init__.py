"""Task definitions (YAML files in data/tasks/) and the preparation of seeded calibration/evaluation sets."""

from diet.tasks.prepare import calibration_text, prepare_task, read_calibration, read_prepared
from diet.tasks.spec import TaskSpec, available_tasks, load_task

__all__ = ["TaskSpec", "available_tasks", "load_task", "prepare_task", "read_prepared", "read_calibration",
           "calibration_text"]
