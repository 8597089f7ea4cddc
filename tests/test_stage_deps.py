"""dvc.yaml declares, for every stage, exactly the project files its code can import (tests/stage_deps.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tests.stage_deps import PACKAGES, ROOT, closure

SPEC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(body: dict) -> str:
    """``stages.X`` of a stage whose command is ``python -m stages.X ...``."""
    cmd = shlex.split(body["cmd"])
    assert cmd[:2] == ["python", "-m"] and cmd[2].startswith("stages."), cmd
    return cmd[2]


def declared_code(body: dict) -> set[Path]:
    return {Path(d) for d in body.get("deps", []) if Path(d).parts[0] in PACKAGES}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_stage_declares_exactly_its_import_closure(name):
    body = SPEC[name].get("do", SPEC[name])
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
