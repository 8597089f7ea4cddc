"""dvc.yaml's cache keys: an expensive stage names the version of what it computes (diet/versions.py) and no code;
a cheap stage declares exactly the project files its code can import (tests/stage_deps.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import diet.versions
from tests.stage_deps import PACKAGES, ROOT, closure

SPEC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
VERSIONS_FILE = "diet/versions.py"
#: the stages whose results are expensive, by the versions they declare (every other stage takes seconds)
VERSIONED = {"model": {"MODEL"}, "prepare": {"PREPARE"}, "score": {"SCORE"}, "score_generic": {"SCORE", "GENERIC"},
             "evaluate_dense": {"EVALUATE"}, "evaluate": {"EVALUATE"}, "perplexity_dense": {"PERPLEXITY"},
             "perplexity": {"PERPLEXITY"}}


def stage_module(body: dict) -> str:
    """``stages.X`` of a stage whose command is ``python -m stages.X ...``."""
    cmd = shlex.split(body["cmd"])
    assert cmd[:2] == ["python", "-m"] and cmd[2].startswith("stages."), cmd
    return cmd[2]


def declared_code(body: dict) -> set[Path]:
    return {Path(d) for d in body.get("deps", []) if Path(d).parts[0] in PACKAGES}


def declared_versions(body: dict) -> set[str]:
    entries = [p[VERSIONS_FILE] for p in body.get("params", []) if isinstance(p, dict) and VERSIONS_FILE in p]
    return {key for keys in entries for key in keys}


@pytest.mark.parametrize("name", sorted(VERSIONED))
def test_an_expensive_stage_names_its_versions_and_no_code(name):
    body = SPEC[name].get("do", SPEC[name])
    assert declared_code(body) == set(), (
        f"stage '{name}': an expensive stage must not list code deps (any edit would recompute it); declare "
        f"the version of what it computes ({VERSIONS_FILE}) instead")
    assert declared_versions(body) == VERSIONED[name]
    for key in VERSIONED[name]:
        assert isinstance(getattr(diet.versions, key), int) and key.lower() in diet.versions.NAMES


def test_every_version_is_declared_by_a_stage():
    declared = {key for keys in VERSIONED.values() for key in keys}
    assert {n.upper() for n in diet.versions.NAMES} == declared
    assert diet.versions.version("score") == diet.versions.SCORE
    with pytest.raises(KeyError, match="one of model"):
        diet.versions.version("scores")


@pytest.mark.parametrize("name", sorted(set(SPEC) - set(VERSIONED)))
def test_a_cheap_stage_declares_exactly_its_import_closure(name):
    body = SPEC[name].get("do", SPEC[name])
    assert not declared_versions(body)
    module = stage_module(body)
    expected = closure(module)
    declared = declared_code(body)
    assert declared == expected, (
        f"stage '{name}': dvc.yaml lists code deps that differ from what {module} can import\n"
        f"  missing: {sorted(map(str, expected - declared))}\n  extra: {sorted(map(str, declared - expected))}\n"
        f"  (print the list with: python -m tests.stage_deps {module})")


def test_closure_follows_lazy_imports_registries_and_exports():
    score = closure("stages.score")
    assert Path("diet/scoring.py") in score and Path("diet/tokens.py") in score       # function-level imports
    assert Path("diet/adapters/gemma2.py") in score                                   # registry entry strings
    assert Path("diet/merge.py") not in score and Path("diet/select.py") not in score  # not reached from score
    evaluate = closure("stages.evaluate")     # `from diet.evaluation import load_eval_task`: a lazy export
    assert Path("diet/evaluation/data.py") in evaluate and Path("diet/evaluation/report.py") not in evaluate
    assert not any(p.parts[0] == "flows" for s in SPEC for p in closure(stage_module(SPEC[s].get("do", SPEC[s]))))
