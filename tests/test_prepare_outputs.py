"""The prepare stage reads the pipeline's outputs while other stages may be rewriting dvc.lock."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import stages.prepare as prepare
from diet.errors import DietError
from tests.repo_fixture import dvc, dvc_env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project with one stage whose output is ``out/``."""
    subprocess.run([dvc(), "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=dvc_env())
    (tmp_path / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p out\n    outs:\n      - out\n")
    return tmp_path


HALF_WRITTEN = "schema: '2.0'\nstages:\n  ma"  # a dvc.lock cut off while DVC writes it


def _flaky_repo(monkeypatch, project: Path, failures: int) -> list:
    """The first ``failures`` reads of the pipeline find dvc.lock half-written; later ones find it gone."""
    import dvc.repo

    real, calls, lock = dvc.repo.Repo, [], project / "dvc.lock"

    class Repo(real):
        def __init__(self, root=None, *args, **kwargs):
            if root == str(project):  # the stage's read, not DVC's own inner ones
                calls.append(root)
                if len(calls) <= failures:
                    lock.write_text(HALF_WRITTEN)
                else:
                    lock.unlink(missing_ok=True)
            super().__init__(root, *args, **kwargs)

    monkeypatch.setattr(dvc.repo, "Repo", Repo)
    monkeypatch.setattr(prepare, "LOCK_WAIT_S", 0.0)
    return calls


def test_a_lock_file_caught_half_written_is_read_again(project, monkeypatch):
    calls = _flaky_repo(monkeypatch, project, failures=3)
    outs = prepare.pipeline_outputs(project)
    assert [p.name for p in outs] == ["out"] and len(calls) == 4


def test_a_lock_file_that_never_parses_is_a_clear_error(project, monkeypatch):
    calls = _flaky_repo(monkeypatch, project, failures=10**6)
    with pytest.raises(DietError, match="do not parse") as err:
        prepare.pipeline_outputs(project)
    assert "git checkout dvc.lock" in err.value.fix and len(calls) == prepare.LOCK_READS
