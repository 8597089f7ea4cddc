"""Golden outputs of every versioned computation (diet/versions.py), computed on tiny inputs.

Each computation the pipeline caches under a version (the base checkpoint, a prepared task, a score file, the
generic texts, per-item evaluation results, perplexity) is run here on tiny seeded models (one per family
where the families take different code paths) and tiny data; ``tests/golden/<name>.json`` holds what it gave
and the version it was made under. tests/test_golden.py recomputes each and fails when the output moved while
the version did not, naming the entry of diet/versions.py to bump.

    python -m tests.golden --update score      # after bumping SCORE in diet/versions.py: rewrite its golden file
    python -m tests.golden --update            # every golden file

Floats are compared with a relative tolerance (``RTOL``) far above what another CPU's kernels move (a few
float32 steps) and far below what any change to a computation does; text, integers and hashes exactly. Large
tensors are kept as fingerprints (sum, sum of magnitudes, a position-weighted sum, first values), which move
when any value, its place or its sign does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
RTOL = 1e-4
ATOL = 1e-7


# -- inputs -----------------------------------------------------------------------------------------------------
TEXTS = ["the cat sat on the mat", "a", "question: why is the sky blue? answer: scattering",
         "one two three four five six seven eight nine ten", "zebra", "hello world, hello again",
         "pack my box with five dozen liquor jugs", "the quick brown fox jumps over the lazy dog again and again"]
WORDS = ["the quick brown fox", "carbon dioxide", "plants", "a small model", "five dozen liquor jugs",
         "the lazy dog", "every layer"]


def _eval_tasks(root: Path) -> dict[str, Path]:
    """Three tiny prepared tasks, one per scoring path: several choices, partial scoring, one-token choices."""
    mc = [{"id": f"mc-{i}", "context": f"question: which one is {WORDS[i % 7]}? answer:",
           "choices": [WORDS[(i + j) % 7] for j in range(2 + i % 3)], "label": i % (2 + i % 3)} for i in range(6)]
    wg = [{"id": f"wg-{i}", "context": [f"the pack had {WORDS[i]}, so {WORDS[i]}", f"the pack had {WORDS[i]}, so "
                                        f"{WORDS[i + 2]}"], "choices": ["jumps over the lazy dog."] * 2,
           "label": i % 2} for i in range(4)]
    yn = [{"id": f"yn-{i}", "context": f"{' and '.join(WORDS[:i + 1])}? answer:", "choices": ["a", "the"],
           "label": i % 2} for i in range(5)]
    out = {}
    for name, rows, partial in (("mc", mc, False), ("wg", wg, True), ("yn", yn, False)):
        d = root / name
        d.mkdir(parents=True)
        (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "eval.json").write_text(json.dumps({"task": name, "target_delimiter": " ", "partial": partial,
                                                 "n_calib": 0, "n_eval": len(rows)}))
        out[name] = d
    return out


def fingerprint(t) -> dict:
    """A tensor as a few numbers that move when any value, its position or its sign moves."""
    import torch

    x = t.detach().to(torch.float64).flatten()
    w = torch.cos(torch.arange(x.numel(), dtype=torch.float64) * 0.7)  # position weights
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sum": x.sum().item(),
            "abs_sum": x.abs().sum().item(), "weighted": (x * w).sum().item(), "first": x[:4].tolist()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        old = os.getcwd()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


# -- the computations -------------------------------------------------------------------------------------------
def compute_model() -> dict:
    """``stages.model``: a model folder given as model.source, written out as the base checkpoint."""
    from safetensors.torch import load_file

    from diet.model_sources import materialise
    from tests.tiny import tiny_model, tiny_tokenizer

    out = {}
    for family in ("llama", "gemma3_text"):
        with _workdir() as tmp:
            tiny_model(family).save_pretrained(tmp / "src")
            tiny_tokenizer().save_pretrained(tmp / "src")
            provenance = materialise("src", "base")      # relative: the provenance records the source as written
            base = tmp / "base"
            tensors = load_file(base / "model.safetensors")
            out[family] = {"provenance": provenance,
                           "files": sorted(p.name for p in base.iterdir()),
                           "config": json.loads((base / "config.json").read_text()),
                           "tokenizer.json": _sha(base / "tokenizer.json"),
                           "tensors": {k: fingerprint(v) for k, v in sorted(tensors.items())}}
    return out


def compute_prepare() -> dict:
    """``stages.prepare``: calibration and evaluation items of a plain and a partial-scoring built-in task."""
    from diet.tasks import load_task, prepare_task

    out = {}
    for name in ("arc_easy", "winogrande"):
        with _workdir() as tmp:
            meta = prepare_task(load_task(name, ROOT / "data" / "tasks"), tmp / name, n_samples=6, seed=0,
                                eval_limit=6, eval_seed=1234)
            out[name] = {"meta": meta, **{f: _sha(tmp / name / f) for f in ("calib.jsonl", "eval.jsonl", "eval.json")}}
    return out


def compute_score() -> dict:
    """``stages.score``: score tensors and moments of every family and group, both statistics, weight norms."""
    from diet.scoring import score_texts
    from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    out = {}
    runs = [(f, "mean_abs", False) for f in FAMILIES] + [("llama", "l2", True)]
    for family, statistic, weight_norm in runs:
        tensors, stats = score_texts(tiny_model(family), tok, TEXTS, groups=["mlp", "attention", "hidden"],
                                     statistic=statistic, weight_norm=weight_norm, batch_size=3, max_length=16,
                                     add_bos=family.startswith("gemma"), progress=False)
        out[f"{family} {statistic}{' weight_norm' if weight_norm else ''}"] = {
            "stats": stats, "tensors": {k: fingerprint(v) for k, v in sorted(tensors.items())}}
    return out


def compute_generic() -> dict:
    """``stages.score_generic``'s texts (the scoring itself is SCORE's)."""
    from diet.generic import generic_source, generic_texts

    texts = generic_texts(12, seed=0)
    return {"source": generic_source()[0], "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
            "first": texts[0][:80]}


def compute_evaluate() -> dict:
    """``stages.evaluate``: per-item results of every family on the three scoring paths."""
    from diet.evaluation.loglik import evaluate_tasks_direct
    from tests.tiny import FAMILIES, bos_tokenizer, tiny_model, tiny_tokenizer

    out = {}
    with _workdir() as tmp:
        tasks = _eval_tasks(tmp)
        for family in FAMILIES:   # Gemma's tokenizers prepend BOS
            tok = bos_tokenizer() if family.startswith("gemma") else tiny_tokenizer()
            out[family] = evaluate_tasks_direct(tiny_model(family), tok, tasks, batch_size=3)
    return out


def compute_perplexity() -> dict:
    """``stages.perplexity``: the held-out passages and a tiny model's perplexity on them."""
    from diet.evaluation.perplexity import heldout_passages, perplexity
    from diet.geometry import parameter_counts
    from tests.tiny import bos_tokenizer, tiny_model, tiny_tokenizer

    passages = heldout_passages(4)
    out = {"passages": hashlib.sha256(json.dumps(passages).encode()).hexdigest()}
    for family in ("llama", "gemma3_text"):
        model, tok = tiny_model(family), bos_tokenizer() if family.startswith("gemma") else tiny_tokenizer()
        out[family] = {"perplexity": perplexity(model, tok, passages, max_length=24, batch_size=3, progress=False),
                       "params": parameter_counts(model)}
    return out


COMPUTE: dict[str, Callable[[], dict]] = {
    "model": compute_model, "prepare": compute_prepare, "score": compute_score, "generic": compute_generic,
    "evaluate": compute_evaluate, "perplexity": compute_perplexity}


# -- comparison -------------------------------------------------------------------------------------------------
def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected``: floats beyond RTOL/ATOL, anything else at all."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing" for k in expected if k not in actual]
        out += [f"{path}/{k}: new" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += differences(expected[k], actual[k], f"{path}/{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} entries, now {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and \
                not isinstance(expected, bool) and not isinstance(actual, bool) and \
                math.isclose(expected, actual, rel_tol=RTOL, abs_tol=ATOL):
            return []
        return [f"{path}: {expected!r}, now {actual!r}"]
    return [] if expected == actual else [f"{path}: {expected!r}, now {actual!r}"]


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def normalised(output: dict) -> Any:
    """``output`` as the JSON the golden file holds (tuples as lists, and so on)."""
    return json.loads(json.dumps(output, sort_keys=True))


def check(name: str, output: dict | None = None) -> None:
    """Raise AssertionError, naming the version to bump, when ``name``'s output is not its golden output."""
    from diet.versions import version

    key, path = name.upper(), golden_path(name)
    regenerate = f"python -m tests.golden --update {name}"
    if not path.is_file():
        raise AssertionError(f"no golden output for {name} ({path}): write it with {regenerate}")
    golden = json.loads(path.read_text())
    if golden["version"] != version(name):
        raise AssertionError(
            f"{path.name} was made under {key} = {golden['version']}, diet/versions.py says {version(name)}: "
            f"after a deliberate bump, rewrite it with {regenerate}")
    diffs = differences(golden["output"], normalised(COMPUTE[name]() if output is None else output))
    if diffs:
        shown = "\n  ".join(diffs[:8]) + (f"\n  ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise AssertionError(
            f"the output of {name} changed while its version did not ({key} = {version(name)} in "
            f"diet/versions.py):\n  {shown}\nIf the change is meant, bump {key} in diet/versions.py (cached "
            f"{name} results are then recomputed; say so in the commit message) and run {regenerate}; if not, "
            f"the change broke {name}.")


def update(name: str) -> Path:
    from diet.versions import version

    path = golden_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": version(name), "output": normalised(COMPUTE[name]())}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--update", nargs="*", metavar="NAME", help=f"rewrite golden files ({', '.join(COMPUTE)}; "
                   "default: all)")
    args = p.parse_args(argv)
    if args.update is None:
        p.error("nothing to do: give --update [NAME ...]")
    unknown = [n for n in args.update if n not in COMPUTE]
    if unknown:
        p.error(f"unknown computation {', '.join(unknown)}: one of {', '.join(COMPUTE)}")
    import torch

    torch.set_num_threads(1)
    for name in args.update or list(COMPUTE):
        print(f"wrote {update(name).relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
