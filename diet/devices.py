"""Where a model runs: the ``model.device`` setting resolved on this machine, and the placement of a model of
a given size (one device, or its layers spread over GPUs), decided from its config before any weight is read.
``diet.checkpoint.load_model`` applies it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoModelForCausalLM

from diet.geometry import parameter_counts
from diet.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device that a ``model.device`` setting names on this machine, the model's size aside.

    ``auto`` is the first CUDA GPU when torch sees one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are
    taken as they are, but a CUDA device this machine does not have is a ModelError (call this before loading
    anything, so a wrong setting fails in a second, not after a model load); ``gpus`` needs a GPU and is the
    first one (where a spread model takes its inputs). ``plan_placement`` adds the model's size.
    """
    from diet.config import DEVICE, DEVICE_RULE

    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not DEVICE.fullmatch(spec):
        raise ConfigError(f"model.device = {spec!r} is not a device", f"use {DEVICE_RULE}, e.g. device: auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", 0) if spec == "gpus" else torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model.device = {spec!r} but torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                             "set model.device: auto (or cpu) to run on the CPU, or run on a machine with a GPU "
                             "and a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModelError(f"model.device = {spec!r} but this machine has {count} CUDA GPU(s) "
                             f"(cuda:0 to cuda:{count - 1})",
                             "pick an index below the GPU count, or set model.device: cuda and choose the GPU "
                             "with CUDA_VISIBLE_DEVICES")
    return device


#: the share of a GPU's free memory that the weights may take; the rest is left to activations, the output
#: head's logits (a 262k vocabulary: 1 MB per token in float32) and the scoring statistics
GPU_WEIGHT_SHARE = 0.8


@dataclass(frozen=True)
class Placement:
    """Where a stage puts a model: on one device, or (``max_memory`` set) with its layers spread over GPUs by
    accelerate (``device_map="auto"``, at most ``max_memory[i]`` bytes of weights on GPU ``i``)."""

    device: torch.device                      # where the inputs go: the device, or the embedding's GPU
    max_memory: dict[int | str, int] | None = None

    @property
    def spread(self) -> bool:
        return self.max_memory is not None

    def describe(self) -> str:
        if not self.spread:
            return str(self.device)
        return "layers spread over " + ", ".join(f"{k if isinstance(k, str) else f'cuda:{k}'} (at most "
                                                  f"{v / 2**30:.1f} GiB)" for k, v in self.max_memory.items())


def weight_bytes(config, dtype: torch.dtype) -> int:
    """The bytes of a model's weights in ``dtype``, from its config alone (built on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return parameter_counts(model)["total"] * torch.empty((), dtype=dtype).element_size()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan_placement(spec: str | torch.device, need: Callable[[], int]) -> Placement:
    """Where a model whose weights take ``need()`` bytes runs under the ``model.device`` setting ``spec``.

    On the CPU nothing is measured. With CUDA, each GPU may take ``GPU_WEIGHT_SHARE`` of its free memory:
    ``cuda``/``cuda:N`` must hold the weights alone (else a ModelError that points to ``gpus``); ``gpus``
    spreads the layers over every visible GPU and needs them to hold the weights together; ``auto`` is the
    first GPU when the weights fit there, every GPU when they fit together, else the CPU (logged). Every
    refusal comes before a weight is read.
    """
    device = resolve_device(spec)
    if device.type != "cuda":
        return Placement(device)
    spec = str(spec)
    size = need()
    count = torch.cuda.device_count()
    budgets = {i: int(torch.cuda.mem_get_info(i)[0] * GPU_WEIGHT_SHARE) for i in range(count)}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if spec not in ("auto", "gpus"):
        if size > budgets[index]:
            raise ModelError(f"model.device = {spec!r}: the weights take {_gib(size)}, more than "
                             f"{GPU_WEIGHT_SHARE:.0%} of cuda:{index}'s free {_gib(budgets[index] / GPU_WEIGHT_SHARE)}",
                             f"set model.device: gpus to spread the layers over the {count} visible GPU(s), or a "
                             "smaller model.dtype (bfloat16), or free the GPU")
        return Placement(device)
    if spec == "auto" and size <= budgets[index]:
        return Placement(device)
    total = sum(budgets.values())
    if size <= total:
        return Placement(torch.device("cuda", 0), max_memory=budgets)
    if spec == "gpus":
        raise ModelError(f"model.device = 'gpus': the weights take {_gib(size)}, more than {GPU_WEIGHT_SHARE:.0%} "
                         f"of the {count} GPU(s)' free memory together ({_gib(total)} of "
                         f"{_gib(total / GPU_WEIGHT_SHARE)})",
                         "use a smaller model.dtype (bfloat16), more GPUs, or model.device: cpu")
    log.warning("model.device = auto: the weights take %s, more than the %d GPU(s) can hold (%s): running on "
                "the CPU", _gib(size), count, _gib(total))
    return Placement(torch.device("cpu"))


def device_counts(model) -> str:
    """``cuda:0 x 12, cuda:1 x 14``: how many modules of a dispatched model each device holds."""
    counts: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in counts.items()) or "one device"
