"""One error type for everything a user can get wrong.

Every message names the problem and the fix, so the entry points can print it as-is.
"""


class DietError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


class ConfigError(DietError):
    """A params.yaml section or a task file does not validate."""


class DataError(DietError):
    """Task data cannot be prepared as asked."""


class ModelError(DietError):
    """A model cannot be materialised, adapted or pruned."""
