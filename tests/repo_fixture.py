"""A throwaway git + DVC copy of the project that runs the whole pipeline on a tiny model in about a minute.

``make_tiny_repo(tmp_path)`` copies dvc.yaml, stages/ and diet/ from this checkout, writes small local JSONL
tasks and a tiny random llama model (committed to git, like a team's own model folder would be), a
params.yaml with tiny settings, and commits it all. Run DVC in it with ``dvc_env()``::

    repo = make_tiny_repo(tmp_path, tasks=("t1", "t2"))
    subprocess.run([dvc(), "repro"], cwd=repo, env=dvc_env(), check=True)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROJECT = Path(__file__).resolve().parent.parent
MODEL_DIR = "data/tiny_model"  # committed to git; params model.source points here

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

TINY_PARAMS: dict[str, Any] = {
    "model": {"source": MODEL_DIR, "dtype": "float32", "revision": None},
    "calibration": {"n_samples": 8, "seed": 0, "max_length": 64},
    "score": {"statistic": "mean_abs", "weight_norm": False, "batch_size": 4, "groups": ["mlp", "attention"]},
    "merge": {"method": "vote", "normalize": "zscore", "weights": {}, "seed": 0},
    "prune": {"sparsity": 0.2, "groups": ["mlp"], "recover": "none", "refit_damping": 0.3, "refit_samples": 32,
              "refit_choose": "mask"},
    "select": {"min_keep": 0.05, "multiple": 8, "layout": "global"},
    "evaluate": {"limit": 8, "seed": 1234, "batch_size": 4, "perplexity_docs": 2, "perplexity_max_length": 64,
                 "backend": "direct"},
    "export": {"types": [], "perplexity_docs": 0},
}

_COLOURS = ["red", "blue", "green", "black", "white", "brown"]
_THINGS = ["fox", "dog", "box", "jug", "model", "plant"]


def dvc() -> str:
    """The ``dvc`` next to this interpreter."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def dvc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment (PYTHONPATH unchanged) plus offline, no-analytics and one-thread settings; this
    interpreter's bin folder first on PATH, so the stages' ``python`` is this one."""
    env = {**os.environ, **OFFLINE_ENV}
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _rows(task: str, n: int, split: str) -> list[dict]:
    """Seeded multiple-choice rows; each task has its own question form so task scores differ."""
    rng = random.Random(f"{task}-{split}")
    rows = []
    for i in range(n):
        colour, thing = rng.choice(_COLOURS), rng.choice(_THINGS)
        if int(task.lstrip("t") or 0) % 2:  # odd tasks: pick the colour
            choices = rng.sample(_COLOURS, 3)
            if colour not in choices:
                choices[rng.randrange(3)] = colour
            rows.append({"question": f"the {colour} {thing} jumps over the lazy dog. which colour is the {thing}?",
                         "choices": choices, "answer": choices.index(colour)})
        else:  # even tasks: yes / no
            asked = rng.choice(_COLOURS)
            rows.append({"passage": f"pack my box with a {colour} {thing}", "question": f"is the {thing} {asked}",
                         "answer": int(asked == colour)})
    return rows


def write_task(repo: Path, task: str, n_train: int = 16, n_validation: int = 12) -> Path:
    """A local JSONL task: data/tiny/<task>/{train,validation}.jsonl and its task file data/tasks/<task>.yaml."""
    data = repo / "data" / "tiny" / task
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_validation)):
        with open(data / f"{split}.jsonl", "w") as f:
            for row in _rows(task, n, split):
                f.write(json.dumps(row) + "\n")
    odd = int(task.lstrip("t") or 0) % 2
    spec = {
        "description": f"tiny local task {task}",
        "source": {"datasets": {"path": "json", "data_files": {"train": f"../tiny/{task}/train.jsonl",
                                                               "validation": f"../tiny/{task}/validation.jsonl"}}},
        "splits": {"calibration": "train", "evaluation": "validation"},
        "prompt": "Question: {question}\nAnswer:" if odd else "{passage}\nQuestion: {question}?\nAnswer:",
        "choices": "choices" if odd else ["no", "yes"],
        "label": "answer",
    }
    path = repo / "data" / "tasks" / f"{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


#: a llama wide enough that its kernels split their work over threads (as a real model's do), for the tests of
#: results that must not depend on the thread count
WIDE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32)


def write_tiny_model(path: Path, **overrides) -> Path:
    """tests/tiny.py's llama (config ``overrides``, e.g. ``WIDE``) and tokenizer, saved as a Hugging Face folder."""
    from tests.tiny import tiny_model, tiny_tokenizer

    tiny_model("llama", **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def make_tiny_repo(tmp_path: str | os.PathLike, tasks: Iterable[str] = ("t1", "t2"), *,
                   extra_tasks: Iterable[str] = (), params: Mapping[str, Any] | None = None,
                   name: str = "repo", model: Mapping[str, Any] | None = None) -> Path:
    """Build ``tmp_path/name``: a committed git + DVC project running the real stages on tiny inputs.

    ``tasks`` go into params.yaml; ``extra_tasks`` get task files too but are not listed (a team can add
    them later). ``params`` overrides sections of the tiny params (``{"prune": {"sparsity": 0.3}}``), ``model``
    the tiny model's config (``WIDE``).
    """
    repo = Path(tmp_path) / name
    repo.mkdir(parents=True)
    for part in ("dvc.yaml", "stages", "diet"):
        src = PROJECT / part
        (_copy_tree(src, repo / part) if src.is_dir() else shutil.copy2(src, repo / part))
    tasks = list(tasks)
    for task in dict.fromkeys([*tasks, *extra_tasks]):
        write_task(repo, task)
    write_tiny_model(repo / MODEL_DIR, **(model or {}))

    values: dict[str, Any] = {"tasks": tasks, **{k: dict(v) for k, v in TINY_PARAMS.items()}}
    for section, value in (params or {}).items():
        values[section] = {**values[section], **value} if isinstance(value, Mapping) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    (repo / ".gitignore").write_text((PROJECT / ".gitignore").read_text() if (PROJECT / ".gitignore").exists()
                                     else "__pycache__/\n")

    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "DIET tests")
    git(repo, "config", "user.email", "tests@diet.invalid")
    subprocess.run([dvc(), "init", "-q"], cwd=repo, env=dvc_env(), check=True)
    project_config = PROJECT / ".dvc" / "config"
    if project_config.exists():
        shutil.copy2(project_config, repo / ".dvc" / "config")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny DIET project")
    return repo


def clone(repo: Path, dest: Path) -> Path:
    """A git clone of ``repo`` (no DVC cache: what another team starts from)."""
    subprocess.run(["git", "clone", "-q", str(repo), str(dest)], check=True)
    git(dest, "config", "user.name", "DIET tests")
    git(dest, "config", "user.email", "tests@diet.invalid")
    return dest
