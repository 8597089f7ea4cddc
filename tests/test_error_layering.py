"""The library names what to regenerate, the stage layer how: no module under diet/ spells a ``dvc repro``
command, every artifact kind a DietError can name has its command in stages/_common.py, and the stages and the
flows print that command after the library's fix."""

from __future__ import annotations

import ast
import logging
import os
import pickle
from pathlib import Path

import pytest

from diet.errors import ARTIFACTS, PER_TASK, ConfigError, DataError, DietError, ModelError
from stages._common import EVERY_TASK, PIPELINE_COMMANDS, pipeline_command, pipeline_fix

ROOT = Path(__file__).resolve().parent.parent
#: the model card text written into every pruned checkpoint: its bytes are part of a pipeline output
EXEMPT = {ROOT / "diet/cards.py"}


def dvc_commands(path: Path) -> list[int]:
    """The lines of the string constants of ``path`` that hold ``dvc repro`` (comments are not constants)."""
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "dvc repro" in node.value]


def test_no_library_module_spells_a_dvc_command():
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "diet").rglob("*.py"))
             if p not in EXEMPT and (lines := dvc_commands(p))}
    assert not found, (
        f"`dvc repro` in library strings: {found}. The library knows nothing of DVC: raise the DietError with "
        "a fix in the library's terms and artifact=<kind>[:<task>] (diet.errors.ARTIFACTS); the stage layer "
        "(stages/_common.py, PIPELINE_COMMANDS) adds the command")


def test_the_check_sees_string_constants_only(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('# run `dvc repro x`\nFIX = "run `dvc repro x`"\nf"then `dvc repro {1}`"\n')
    assert dvc_commands(path) == [2, 3]


def test_every_kind_has_a_command_and_no_command_lacks_a_kind():
    assert set(PIPELINE_COMMANDS) == set(ARTIFACTS)
    assert set(EVERY_TASK) == PER_TASK
    for kind, command in PIPELINE_COMMANDS.items():
        assert ("{name}" in command) == (kind in PER_TASK), kind
        assert command.startswith("`dvc repro ") and command.count("`") % 2 == 0, kind


@pytest.mark.parametrize("artifact, command", [
    ("prepared_task:arc_easy", "`dvc repro prepare@arc_easy`"),
    ("task_scores:boolq", "`dvc repro -f score@boolq`"),
    ("task_scores", "`dvc repro score`"),
    ("generic_scores", "`dvc repro -f score_generic`"),
    ("dense_evaluation:rte", "`dvc repro evaluate_dense@rte`"),
    ("mask", "`dvc repro select`"),
])
def test_pipeline_command(artifact, command):
    assert pipeline_command(artifact) == command


@pytest.mark.parametrize("artifact", ["masks", "mask:x", "prepared_task:", ""])
def test_an_unknown_artifact_is_a_programming_error(artifact):
    with pytest.raises(ValueError):
        DataError("p", "f", artifact=artifact)


def test_the_message_is_the_library_fix_and_the_stage_adds_the_command():
    e = DataError("prepared task data missing: x", "prepare the task data for t1 first",
                  artifact="prepared_task:t1")
    assert str(e) == "prepared task data missing: x\n  fix: prepare the task data for t1 first"
    assert pipeline_fix(e) == "prepare the task data for t1 first; in the pipeline: `dvc repro prepare@t1`"
    assert pipeline_fix(ModelError("p", artifact="gguf")) == "in the pipeline: `dvc repro export`"
    assert pipeline_fix(ConfigError("p", "set x")) == "set x" and ConfigError("p").artifact is None
    assert pipeline_fix(DietError("p")) is None


def test_a_stage_prints_the_command(tmp_path, capsys):
    from stages._common import run_stage, stage_parser

    def main(args, params):
        raise DataError("mask file not found: m.json", "select the mask", artifact="mask")

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert run_stage(main, stage_parser("t"), ["--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: mask file not found: m.json\n  fix: select the mask; in the pipeline: `dvc repro select`\n" in err


def test_a_flow_error_keeps_its_artifact_when_pickled():
    from flows.repo import FlowError

    e = pickle.loads(pickle.dumps(FlowError("p", "f", artifact="merged")))
    assert (type(e), e.problem, e.fix, e.artifact) == (FlowError, "p", "f", "merged")
    assert pipeline_fix(e) == "f; in the pipeline: `dvc repro merge`"


def test_the_flow_cli_prints_the_command(monkeypatch, capsys):
    import flows.cli

    def dispatch(args):
        raise DataError("score file not found: scores/t1.safetensors", "score task 't1' again",
                        artifact="task_scores:t1")

    monkeypatch.setattr(flows.cli, "dispatch", dispatch)
    for key in flows.cli.CHILD_ENV:   # main sets them for its children: put back after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
    factory = logging.getLogRecordFactory()
    try:
        assert flows.cli.main(["report"]) == 2
    finally:
        logging.setLogRecordFactory(factory)
    err = capsys.readouterr().err
    assert "  fix: score task 't1' again; in the pipeline: `dvc repro -f score@t1`" in err
