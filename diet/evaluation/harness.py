"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (every lm-eval import lives here).

Each prepared task becomes an lm-eval task config built as a dict, never a registered built-in task:

* ``dataset_path: json`` reading the task's ``eval.jsonl`` (absolute path) as the ``test`` split;
* ``output_type: multiple_choice`` with metrics ``acc`` and ``acc_norm``;
* a plain row: ``doc_to_text: context``, ``doc_to_choice: choices``, ``doc_to_target: label``;
* a partial-scoring row (WinoGrande): lm-eval's multiple-input form, where ``doc_to_text`` returns the
  gold index, ``doc_to_choice`` the per-choice contexts and ``doc_to_target`` the shared continuation.

The model is evaluated in memory (``HFLM(pretrained=model)``), so a pruned model needs no reload. Nothing is
reseeded (the global RNG states are left as they were), and lm-eval's dataset cache goes to a temporary
folder that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from pathlib import Path

from diet.errors import DietError
from diet.evaluation.data import EvalTask, load_eval_task
from diet.evaluation.loglik import model_max_length
from diet.parallel import single_threaded_on
from diet.tokens import resolve_add_bos

log = logging.getLogger("diet.evaluation")

_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]


def _shared_continuation(doc: dict) -> str:
    return doc["choices"][0]


def task_config(task: EvalTask, cache_dir: str | Path | None = None) -> dict:
    """The lm-eval task config (a dict) of one prepared task."""
    dataset_kwargs: dict = {"data_files": {"test": str(task.eval_path)}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(cache_dir)
    config = {
        "task": f"diet_{task.name}",
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": task.delimiter,
        "metric_list": [dict(m) for m in _METRICS],
        "metadata": {"version": 1},
    }
    if task.partial:
        config.update(doc_to_text="label", doc_to_choice="context", doc_to_target=_shared_continuation)
    else:
        config.update(doc_to_text="context", doc_to_choice="choices", doc_to_target="label")
    return config


@contextlib.contextmanager
def _random_state_kept():
    """lm-eval draws from Python's global RNG (random task ids) even when told not to seed: restore it."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _sync_tied_flag(model) -> None:
    """HFLM calls ``model.tie_weights()``: make the config say what the weights really are first."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    model.config.tie_word_embeddings = bool(out is not None and out.weight is inp.weight)


def _number(value) -> float:
    """lm-eval reports a stderr it cannot compute (one item) as the string 'N/A'."""
    return float(value) if isinstance(value, (int, float)) else float("nan")


def evaluate_tasks(model, tokenizer, tasks: dict[str, str | Path], *, batch_size: int,
                   limit: int | None = None, add_bos: bool | None = None) -> dict[str, dict]:
    """Evaluate ``model`` on prepared tasks ``{name: data_dir}`` with lm-eval.

    Returns ``{name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, items}}``; ``items`` holds each
    question's ``{id, label, lls, acc, acc_norm}``. Any lm-eval failure is a DietError naming the task.
    """
    loaded = {name: load_eval_task(name, data_dir, limit=limit) for name, data_dir in tasks.items()}
    add_bos = resolve_add_bos(model, tokenizer, add_bos)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DietError(f"lm-eval cannot be imported: {e}", "pip install 'lm-eval[hf]==0.4.13'") from e

    _sync_tied_flag(model)
    try:
        # lm-eval warns that an in-memory model "may ignore other model arguments": that is this module's use
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), add_bos_token=add_bos,
                  max_length=model_max_length(model), backend="causal")  # a pruned model's type is ours
    except Exception as e:  # noqa: BLE001 - lm-eval raises anything; the user needs the cause
        raise DietError(f"lm-eval could not wrap the model: {type(e).__name__}: {e}",
                        "check that the model and tokenizer load with transformers") from e
    manager = TaskManager(include_defaults=False)

    out = {}
    # single-threaded kernels: lm-eval's batches run one after the other, and per-item log-likelihoods that
    # no thread count changes are worth the wall-clock time (the direct backend spreads its batches instead)
    with tempfile.TemporaryDirectory(prefix="diet-lmeval-") as cache_dir, _random_state_kept(), \
            single_threaded_on(next(model.parameters()).device):
        for i, (name, task) in enumerate(loaded.items(), 1):
            log.info("task %d/%d: %s (%d items, lm-eval)", i, len(loaded), name, len(task.rows))
            start = time.perf_counter()
            config = task_config(task, cache_dir)
            try:
                res = simple_evaluate(lm, tasks=[config], task_manager=manager, limit=limit, log_samples=True,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                      fewshot_random_seed=None)
                samples = res["samples"][config["task"]]
                metrics = res["results"][config["task"]]
            except Exception as e:  # noqa: BLE001
                raise DietError(f"lm-eval failed on task '{name}' ({task.eval_path}): {type(e).__name__}: {e}",
                                "check the task's prepared rows; re-run its prepare stage") from e
            items = [{"id": str(s["doc"]["id"]), "label": s["doc"]["label"],
                      "lls": [float(r[0]) for r in s["filtered_resps"]],
                      "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])}
                     for s in sorted(samples, key=lambda s: s["doc_id"])]
            out[name] = {key: _number(metrics.get(f"{key},none"))
                         for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
            out[name].update(n=len(items), items=items)
            log.info("%s: acc %.4f  acc_norm %.4f  (n=%d, %.1fs)", name, out[name]["acc"], out[name]["acc_norm"],
                     out[name]["n"], time.perf_counter() - start)
    return out
