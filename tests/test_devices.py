"""Devices and dtypes: ``model.device`` is validated and resolved before any model loads; the bfloat16 path
(``model.dtype: bfloat16`` with ``score.precision: model``, the GPU settings) gives the float32 scores and
mask within a stated tolerance. All on the CPU: CUDA is simulated by patching ``torch.cuda``."""

import pytest
import torch

from diet.config import Params, ScoreConfig
from diet.errors import ConfigError, ModelError
from diet.modeling import load_model, resolve_device
from diet.scoring import forward_precision, resolve_precision
from tests.tiny import tiny_model, tiny_tokenizer


def _gpus(monkeypatch, count: int) -> None:
    """Make torch report ``count`` CUDA GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_param_accepts_the_documented_forms(device):
    assert Params.from_dict({"model": {"device": device}}).model.device == device


def test_device_param_defaults_to_auto():
    assert Params.from_dict({}).model.device == "auto"


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "", 0, None])
def test_bad_device_strings_are_refused(device):
    with pytest.raises(ConfigError, match="model.device") as e:
        Params.from_dict({"model": {"device": device}})
    assert "cuda:N" in e.value.fix


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_first_gpu_with_one(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_this_machine_resolves_auto_to_what_torch_sees():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, device):
    _gpus(monkeypatch, 0)
    with pytest.raises(ModelError, match="no CUDA GPU") as e:
        resolve_device(device)
    assert "model.device: auto" in e.value.fix


def test_a_gpu_index_past_the_count_is_refused(monkeypatch):
    _gpus(monkeypatch, 2)
    with pytest.raises(ModelError, match="has 2 CUDA GPU") as e:
        resolve_device("cuda:2")
    assert "CUDA_VISIBLE_DEVICES" in e.value.fix


def test_resolve_device_refuses_what_the_param_refuses():
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cuda_fails_before_the_model_is_read(monkeypatch, tiny_dir):
    import diet.modeling

    _gpus(monkeypatch, 0)
    reads = []
    real = diet.modeling.read_config
    monkeypatch.setattr(diet.modeling, "read_config", lambda path: reads.append(path) or real(path))
    with pytest.raises(ModelError, match="no CUDA GPU"):
        load_model(tiny_dir, device="cuda")
    assert reads == []                                     # not a byte of the checkpoint was read
    model = load_model(tiny_dir, device="cpu")
    assert reads == [tiny_dir] and next(model.parameters()).device == torch.device("cpu")


def test_stage_fails_on_cuda_before_loading(monkeypatch, tmp_path, capsys):
    """A stage with model.device: cuda on a machine without a GPU exits 2 with the device problem, even though
    its model folder does not exist: the device is checked first."""
    from stages import perplexity
    from stages._common import run_stage

    _gpus(monkeypatch, 0)
    (tmp_path / "params.yaml").write_text("model:\n  device: cuda\n")
    code = run_stage(perplexity.main, perplexity.parser(),
                     ["--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "absent"),
                      "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no CUDA GPU" in err and "fix: set model.device: auto" in err and "absent" not in err
    assert not (tmp_path / "out.json").exists()


def test_precision_auto_is_float64_on_the_cpu_and_model_on_a_gpu():
    assert resolve_precision("auto", "cpu") == "float64"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "model"
    assert resolve_precision("float64", "cuda") == "float64"   # an explicit float64 is kept on a GPU
    assert resolve_precision("model", "cpu") == "model"
    assert ScoreConfig().precision == "float64"                # the CPU default is unchanged
    model = tiny_model("llama")
    seen = []
    with forward_precision(model, "auto"):
        seen.append(next(model.parameters()).dtype)
    assert seen == [torch.float64] and next(model.parameters()).dtype == torch.float32


# --- the bfloat16 path ------------------------------------------------------------------------------------

TEXTS = {
    "colours": ["the red fox jumps over the lazy dog", "which colour is the box? the box is green",
                "a black jug and a white plant", "the brown dog is in the blue box"] * 2,
    "numbers": ["count 0 1 2 3 4 5 6 7 8 9", "five dozen liquor jugs, then 3 4 5",
                "question: which gas do plants take in? answer: carbon dioxide", "9 8 7 6 5 4 3 2 1 0"] * 2,
}
#: bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); over three layers the activations' rounding
#: errors grow to a few per cent of a score
SCORE_RTOL = 0.05


def _scores(dtype: torch.dtype, precision: str):
    from diet.scoring import score, split_scores

    model = tiny_model("llama").to(dtype)
    cfg = ScoreConfig(groups=("mlp", "attention"), precision=precision, batch_size=4)
    out = {}
    for task, texts in TEXTS.items():
        tensors, _ = score(model, tiny_tokenizer(), texts, cfg, max_length=64, progress=False)
        out[task] = split_scores(tensors)[0]
    return model, out


def test_bfloat16_scores_and_mask_match_float32():
    from diet import api
    from diet.config import PruneConfig, SelectConfig

    dense, ref = _scores(torch.float32, "float64")
    _, bf16 = _scores(torch.bfloat16, "model")
    for task in TEXTS:
        for group, r in ref[task].items():
            b = bf16[task][group]
            assert b.dtype == torch.float32 and b.shape == r.shape                       # (L, W)
            rel = ((b - r).abs() / r.abs().clamp_min(1e-6)).max().item()
            assert rel < SCORE_RTOL, f"{task}/{group}: bfloat16 scores differ from float32 by {rel:.3%}"

    geo = api.geometry(dense, ("mlp",))
    masks = {}
    for name, scores in (("float32", ref), ("bfloat16", bf16)):
        _, masks[name] = api.plan({t: {"mlp": s["mlp"]} for t, s in scores.items()}, geo,
                                  prune_cfg=PruneConfig(0.2, ("mlp",)), select_cfg=SelectConfig(multiple=1))
    keep32 = [set(k.tolist()) for k in masks["float32"].keep_tensors()["mlp"]]         # per layer: kept ids
    keep16 = [set(k.tolist()) for k in masks["bfloat16"].keep_tensors()["mlp"]]
    diff = {layer: sorted(a ^ b) for layer, (a, b) in enumerate(zip(keep32, keep16)) if a != b}
    assert not diff, (f"at sparsity 0.2 the bfloat16 mask keeps other MLP channels than the float32 one "
                      f"(layer: channels in one mask only): {diff}; widths {masks['float32'].widths['mlp']} "
                      f"vs {masks['bfloat16'].widths['mlp']}")
