"""Lazy registries of the names contributors extend, and the merge methods' entries (torch-free).

A ``Registry`` maps a name to ``"module:object"``, imported on first ``get``, and to the facts its callers
need before importing anything (config validation, the flows, the stage that gathers a method's inputs)::

    from diet.registry import MERGE_METHODS

    MERGE_METHODS.names()                       # ('vote', 'mean', ..., 'flap')
    MERGE_METHODS.facts("wanda_sp").inputs      # ('moments',)
    MERGE_METHODS.get("vote")                   # the function diet.merge_methods.vote (imports torch)
    MERGE_METHODS.register("neg_magnitude", "my_methods:order", inputs=("magnitude",))

``register`` serves code outside the package (a notebook, a test, a script that calls ``diet.prune``): the
entry lives in that process only. The DVC stages run in their own processes and know the built-in entries
of ``MERGE_METHODS`` below; a method the pipeline runs is an entry there (docs/extending.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

from diet.errors import ConfigError

F = TypeVar("F")


class Registry(Generic[F]):
    """Names -> ``"module:object"`` targets imported on use, each with its facts (an ``F``).

    ``key`` is the params key the names are chosen with (``merge.method``): an unknown name is a ConfigError
    that lists the known ones. ``make_facts(**kwargs)`` builds (and checks) the facts of ``register``.
    """

    def __init__(self, key: str, make_facts: Callable[..., F], entries: Mapping[str, tuple[str, F]] = ()):
        self.key = key
        self._make_facts = make_facts
        self._entries: dict[str, tuple[str, F]] = dict(entries)

    def register(self, name: str, target: str, **facts: Any) -> None:
        """Add ``name`` -> ``target`` (``"module:object"``) with its facts; a name is registered once."""
        if not isinstance(name, str) or not name or "+" in name or name != name.strip():
            raise ConfigError(f"{self.key} name {name!r} is not a name", "use letters, digits and '_', e.g. my_method")
        if name in self._entries:
            raise ConfigError(f"{self.key} {name!r} is already registered (as {self._entries[name][0]})",
                              "pick another name, or unregister the old entry first")
        module, _, obj = str(target).partition(":")
        if not module or not obj:
            raise ConfigError(f"{self.key} {name!r}: target {target!r} is not 'module:object'",
                              "name the object by its module and attribute, e.g. my_methods:order")
        self._entries[name] = (target, self._make_facts(**facts))

    def unregister(self, name: str) -> None:
        """Remove ``name`` (an entry added by ``register``, or a built-in one)."""
        self.check(name)
        del self._entries[name]

    def names(self, where: Callable[[F], bool] | None = None) -> tuple[str, ...]:
        """The registered names in registration order; with ``where``, those whose facts satisfy it."""
        return tuple(n for n, (_, facts) in self._entries.items() if where is None or where(facts))

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else a ConfigError naming the known names."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"{self.key} = {name!r} is not supported", f"use one of: {', '.join(self._entries)}")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def target(self, name: str) -> str:
        return self._entries[self.check(name)][0]

    def facts(self, name: str) -> F:
        return self._entries[self.check(name)][1]

    def get(self, name: str) -> Any:
        """The object ``name`` stands for, imported on use."""
        return load(self.target(name))


def load(target: str) -> Any:
    """The object of ``"module:object"`` (``"module:a.b"`` follows attributes)."""
    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# -- merge methods -----------------------------------------------------------------------------------------------
#: what a merge method can rank with, besides the tasks' keep sets and votes that every method is given:
#: ``tasks`` (its order depends on the tasks' scores: the merge weights count, and recovery uses the tasks'
#: calibration data), ``generic`` (the generic text's scores), ``magnitude`` (the weight norms of each dimension),
#: ``moments`` (a per-channel metric of the generic text's activation moments and the model's weights, computed
#: by the method's ``channels`` function: ``diet.merge.moment_baseline_scores``)
INPUTS = ("tasks", "generic", "magnitude", "moments")


@dataclass(frozen=True)
class MergeMethod:
    """The facts of a merge method.

    ``inputs``: of ``INPUTS``, what its order reads. ``field_baseline``: a method of the field that the reports
    compare every row with (``vs best baseline``). ``channels``: for ``moments``, the ``"module:function"`` that
    scores one layer's channels, ``channels(readers, mean, var) -> (D,)`` (``diet.merge_methods.wanda_sp_channels``).
    """

    inputs: tuple[str, ...] = ()
    field_baseline: bool = False
    channels: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        bad = [i for i in self.inputs if i not in INPUTS]
        if bad or isinstance(self.inputs, str):
            raise ConfigError(f"merge method inputs {list(self.inputs)} name unknown inputs {bad}",
                              f"use some of: {', '.join(INPUTS)}")
        if ("moments" in self.inputs) != (self.channels is not None):
            raise ConfigError("a merge method reads 'moments' exactly when it names its channels function",
                              "pass inputs=('moments',) with channels='module:function', or neither")

    @property
    def uses_tasks(self) -> bool:
        """Its order depends on the tasks (leave-one-task-out holds a task out of it; recovery uses the tasks)."""
        return "tasks" in self.inputs


#: the built-in merge methods (docs/method.md): DIET's vote, its ablations, and the baselines; each target is
#: ``order(m: diet.merge.MergeInput) -> sort keys`` (``diet.merge_methods``)
MERGE_METHODS: Registry[MergeMethod] = Registry("merge.method", MergeMethod, {
    "vote": ("diet.merge_methods:vote", MergeMethod(inputs=("tasks",))),
    "mean": ("diet.merge_methods:mean", MergeMethod(inputs=("tasks",))),
    "rank": ("diet.merge_methods:rank", MergeMethod(inputs=("tasks",))),
    "task_agnostic": ("diet.merge_methods:task_agnostic", MergeMethod(inputs=("generic",))),
    "magnitude": ("diet.merge_methods:magnitude", MergeMethod(inputs=("magnitude",))),
    "random": ("diet.merge_methods:random", MergeMethod()),
    "wanda_sp": ("diet.merge_methods:wanda_sp", MergeMethod(inputs=("moments",), field_baseline=True,
                                                            channels="diet.merge_methods:wanda_sp_channels")),
    "flap": ("diet.merge_methods:flap", MergeMethod(inputs=("moments",), field_baseline=True,
                                                    channels="diet.merge_methods:flap_channels")),
})
