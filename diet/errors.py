"""One error type for everything a user can get wrong.

Every message names the problem and the fix, so the entry points can print it as-is. An error that a rewritten
file would fix also names that file's artifact (``ARTIFACTS``), in the library's terms: the entry points that know
how the artifact is made (the stages, the flows) add the command that remakes it.
"""

#: the artifacts whose regeneration can fix an error, by kind; an error names one as ``"<kind>"`` or, for a
#: kind made per task (``PER_TASK``), ``"<kind>:<task>"`` (a per-task kind without a task: every task's)
ARTIFACTS = {
    "base_model": "the dense model folder materialised from its source",
    "pruned_model": "the pruned checkpoint folder",
    "checkpoint": "a model folder the error cannot tell apart: the base model or the pruned checkpoint",
    "prepared_task": "a task's prepared calibration and evaluation data",
    "task_scores": "a task's score file (channel scores and activation moments)",
    "generic_scores": "the score file of the generic text",
    "merged": "the merged priorities of every task's scores",
    "mask": "the mask file selected from the merged priorities",
    "evaluation": "the pruned model's evaluation result of a task (per-item log-likelihoods)",
    "dense_evaluation": "the dense model's evaluation result of a task",
    "perplexity": "the pruned model's perplexity result (per-passage values)",
    "dense_perplexity": "the dense model's perplexity result",
    "gguf": "the GGUF files exported from the pruned checkpoint",
}
#: the kinds made once per task
PER_TASK = frozenset({"prepared_task", "task_scores", "evaluation", "dense_evaluation"})


def check_artifact(artifact: str | None) -> str | None:
    """``artifact`` itself when it names a known kind (and a task only for a per-task kind); ValueError
    otherwise: a wrong artifact is a mistake in the code that raises the error, not the user's."""
    if artifact is None:
        return None
    kind, sep, name = artifact.partition(":")
    if kind not in ARTIFACTS:
        raise ValueError(f"unknown artifact kind {kind!r} in {artifact!r}: one of {', '.join(ARTIFACTS)}")
    if sep and (kind not in PER_TASK or not name):
        raise ValueError(f"artifact {artifact!r}: only {', '.join(sorted(PER_TASK))} name a task, as kind:task")
    return artifact


class DietError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` says what to do, ``artifact`` names the
    artifact (``ARTIFACTS``) whose regeneration fixes it, when one does."""

    def __init__(self, problem: str, fix: str | None = None, *, artifact: str | None = None):
        self.problem = problem
        self.fix = fix
        self.artifact = check_artifact(artifact)
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ConfigError(DietError):
    """A params.yaml section or a task file does not validate."""


class DataError(DietError):
    """Task data cannot be prepared as asked."""


class ModelError(DietError):
    """A model cannot be materialised, adapted or pruned."""
