"""The registries of names (``diet.registry``): config validation reads them, and an unknown name lists them."""

from __future__ import annotations

import pytest

from diet.config import EvaluateConfig, MergeConfig, ModelConfig, SelectConfig
from diet.errors import ConfigError
from diet.registry import EVAL_BACKENDS, LAYOUTS, MODEL_SOURCES, NORMALIZATIONS, load


@pytest.mark.parametrize("registry, config, key", [
    (NORMALIZATIONS, lambda v: MergeConfig(normalize=v), "merge.normalize"),
    (LAYOUTS, lambda v: SelectConfig(layout=v), "select.layout"),
    (EVAL_BACKENDS, lambda v: EvaluateConfig(backend=v), "evaluate.backend"),
])
def test_config_checks_names_against_the_registry(registry, config, key):
    for name in registry.names():
        config(name).validate()
    with pytest.raises(ConfigError) as err:
        config("nope").validate()
    assert err.value.problem == f"{key} = 'nope' is not supported"
    assert err.value.fix == "use one of: " + ", ".join(registry.names())


def test_every_target_imports():
    for registry in (NORMALIZATIONS, LAYOUTS, EVAL_BACKENDS, MODEL_SOURCES):
        for name in registry:
            assert callable(load(registry.target(name))), (registry.key, name)


def test_registries_read_as_mappings_of_facts():
    assert list(LAYOUTS) == ["global", "uniform"] and LAYOUTS["uniform"].uniform and not LAYOUTS["global"].uniform
    assert dict(MODEL_SOURCES.items())["smollm2"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(KeyError):
        MODEL_SOURCES["nope"]


def test_an_empty_model_source_lists_the_built_ins():
    with pytest.raises(ConfigError, match="set it to smollm2, gemma3-270m, a local model folder"):
        ModelConfig(source=" ").validate()
