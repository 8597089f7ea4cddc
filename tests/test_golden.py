"""Every versioned computation (diet/versions.py) still gives its golden output, or its version was bumped
(tests/golden.py: how the outputs are computed and how to rewrite them)."""

from __future__ import annotations

import json

import pytest
import torch

import diet.versions
from tests import golden
from tests.test_tasks import needs_olmo


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_olmo) if n in ("prepare", "generic", "perplexity")
                                  else n for n in golden.COMPUTE])
def test_output_is_golden_or_its_version_was_bumped(name):
    golden.check(name)


def test_every_version_has_a_golden_computation():
    assert set(golden.COMPUTE) == set(diet.versions.NAMES)
    for name in diet.versions.NAMES:
        assert json.loads(golden.golden_path(name).read_text())["version"] == diet.versions.version(name)


def test_a_changed_statistic_fails_and_names_the_version_to_bump(monkeypatch):
    from diet.scoring import ActivationStats

    real = ActivationStats.batch_sums

    def patched(self, x, mask=None):  # mean_abs of 1.001 |a|: a small, plausible change of what a score computes
        s, signed, sq, n = real(self, x, mask)
        return s * 1.001, signed, sq, n

    monkeypatch.setattr(ActivationStats, "batch_sums", patched)
    with pytest.raises(AssertionError) as err:
        golden.check("score")
    text = str(err.value)
    assert "the output of score changed while its version did not (SCORE = " in text
    assert "bump SCORE in diet/versions.py" in text and "python -m tests.golden --update score" in text
    assert "mean_abs/tensors/attention/abs_sum: " in text        # where it moved


def test_a_changed_item_result_fails_for_evaluate(monkeypatch):
    import diet.evaluation.loglik as loglik

    real = loglik.score_task

    def patched(*args, **kwargs):   # one log-likelihood moved by 1%
        out = real(*args, **kwargs)
        out["items"][0]["lls"][0] *= 1.01
        return out

    monkeypatch.setattr(loglik, "score_task", patched)
    with pytest.raises(AssertionError, match=r"bump EVALUATE in diet/versions.py"):
        golden.check("evaluate")


def test_a_bumped_version_asks_for_the_golden_file_to_be_rewritten(monkeypatch):
    monkeypatch.setattr(diet.versions, "SCORE", diet.versions.SCORE + 1)
    with pytest.raises(AssertionError, match=r"score.json was made under SCORE = \d+, diet/versions.py says \d+: "
                                             r"after a deliberate bump, rewrite it with python -m tests.golden"):
        golden.check("score", output={})


def test_differences_tolerate_last_bits_not_changes():
    assert golden.differences({"a": [1.0, 2, "x"]}, {"a": [1.0 + 1e-9, 2, "x"]}) == []
    assert golden.differences({"a": 1.0}, {"a": 1.001}) == ["/a: 1.0, now 1.001"]
    assert golden.differences({"a": 1, "b": 2}, {"a": 1, "c": 2}) == ["/b: missing", "/c: new"]
    assert golden.differences([1, 2], [1]) == [": 2 entries, now 1"]
    assert golden.differences({"n": 3}, {"n": 3.0}) == []
    assert golden.differences({"t": True}, {"t": 1.0}) == ["/t: True, now 1.0"]
