"""Test setup: offline, single-threaded, isolated caches."""

import os
import tempfile

_OFFLINE = {
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
for _k, _v in _OFFLINE.items():
    os.environ.setdefault(_k, _v)
# Keep datasets/lm-eval caches out of the user's home.
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="diet-test-hf-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def project_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent
