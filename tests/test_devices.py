"""Devices and dtypes: ``model.device`` is validated and resolved before any model loads; the bfloat16 path
(``model.dtype: bfloat16`` with ``score.precision: model``, the GPU settings) gives the float32 scores and
mask within a stated tolerance. All on the CPU: CUDA is simulated by patching ``torch.cuda``."""

import pytest
import torch

from diet.config import Params, ScoreConfig
from diet.errors import ConfigError, ModelError
from diet.devices import resolve_device
from diet.checkpoint import load_model
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
    import diet.checkpoint

    _gpus(monkeypatch, 0)
    reads = []
    real = diet.checkpoint.read_config
    monkeypatch.setattr(diet.checkpoint, "read_config", lambda path: reads.append(path) or real(path))
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


def test_precision_auto_is_the_model_dtype_everywhere_and_float64_is_kept():
    assert resolve_precision("auto", "cpu") == "model"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "model"
    assert resolve_precision("float64", "cuda") == "float64"   # an explicit float64 is kept on a GPU
    assert resolve_precision("model", "cpu") == "model"
    assert ScoreConfig().precision == "model"                  # same bytes at any thread count without float64
    model = tiny_model("llama")
    seen = []
    with forward_precision(model, "float64"):
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
    from diet.scorefile import split_scores
    from diet.scoring import score

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


# --- placement by size: one GPU, the layers spread over every GPU (device_map="auto"), or the CPU ------------

GiB = 2**30


def _gpu_memory(monkeypatch, free_gib: list[float]) -> None:
    """Make torch report one CUDA GPU per entry, with that much free memory."""
    _gpus(monkeypatch, len(free_gib))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(free_gib[i] * GiB), int(80 * GiB)))


def _need(gib: float):
    calls = []

    def need() -> int:
        calls.append(gib)
        return int(gib * GiB)
    return need, calls


def test_gpus_is_a_device_setting_and_needs_a_gpu(monkeypatch):
    assert Params.from_dict({"model": {"device": "gpus"}}).model.device == "gpus"
    _gpus(monkeypatch, 0)
    with pytest.raises(ModelError, match="no CUDA GPU") as e:
        resolve_device("gpus")
    assert "model.device: auto" in e.value.fix


def test_the_cpu_never_measures_the_model(monkeypatch):
    from diet.devices import plan_placement

    _gpus(monkeypatch, 0)
    need, calls = _need(500)
    for spec in ("auto", "cpu"):
        assert plan_placement(spec, need).device == torch.device("cpu") and not plan_placement(spec, need).spread
    assert calls == []


def test_auto_puts_a_model_that_fits_on_the_first_gpu(monkeypatch):
    from diet.devices import plan_placement

    _gpu_memory(monkeypatch, [40, 40])
    need, calls = _need(10)
    placement = plan_placement("auto", need)
    assert placement.device == torch.device("cuda") and not placement.spread and calls == [10]


def test_auto_spreads_a_model_larger_than_one_gpu_over_all(monkeypatch):
    from diet.devices import GPU_WEIGHT_SHARE, plan_placement

    _gpu_memory(monkeypatch, [40, 30, 40])
    placement = plan_placement("auto", _need(60)[0])               # 60 GiB: more than 80% of 40, less than 88
    assert placement.spread and placement.device == torch.device("cuda", 0)
    assert placement.max_memory == {0: int(40 * GiB * GPU_WEIGHT_SHARE), 1: int(30 * GiB * GPU_WEIGHT_SHARE),
                                    2: int(40 * GiB * GPU_WEIGHT_SHARE)}
    assert "cuda:1 (at most 24.0 GiB)" in placement.describe()


def test_auto_falls_back_to_the_cpu_when_the_gpus_cannot_hold_the_model(monkeypatch, caplog):
    from diet.devices import plan_placement

    _gpu_memory(monkeypatch, [40, 40])
    with caplog.at_level("WARNING", logger="diet.checkpoint"):
        placement = plan_placement("auto", _need(70)[0])              # more than 80% of 80
    assert placement.device == torch.device("cpu") and not placement.spread
    assert "running on the CPU" in caplog.text and "70.0 GiB" in caplog.text


def test_gpus_spreads_even_a_small_model_and_refuses_one_too_large(monkeypatch):
    from diet.devices import plan_placement

    _gpu_memory(monkeypatch, [40, 40])
    assert plan_placement("gpus", _need(1)[0]).spread
    with pytest.raises(ModelError, match=r"'gpus': the weights take 70.0 GiB") as e:
        plan_placement("gpus", _need(70)[0])
    assert "bfloat16" in e.value.fix


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_one_named_gpu_too_small_is_refused_with_the_spread_as_fix(monkeypatch, spec):
    from diet.devices import plan_placement

    _gpu_memory(monkeypatch, [40, 20])
    assert not plan_placement(spec, _need(10)[0]).spread
    with pytest.raises(ModelError, match="the weights take 35.0 GiB") as e:
        plan_placement(spec, _need(35)[0])
    assert "model.device: gpus" in e.value.fix and "2 visible GPU" in e.value.fix


def test_the_weights_size_comes_from_the_config_alone(tiny_dir):
    from diet.devices import weight_bytes
    from diet.checkpoint import read_config

    model = tiny_model("llama")
    n = sum(p.numel() for p in model.parameters())                 # tied embedding and head counted once
    config = read_config(tiny_dir)
    assert weight_bytes(config, torch.float32) == 4 * n
    assert weight_bytes(config, torch.bfloat16) == 2 * n


def test_a_model_too_large_for_the_gpu_fails_before_its_weights_are_read(monkeypatch, tiny_dir):
    import diet.checkpoint

    _gpu_memory(monkeypatch, [1e-6])                               # about 1 KiB free
    loads = []
    monkeypatch.setattr(diet.checkpoint.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(k) or pytest.fail("weights read"))
    with pytest.raises(ModelError, match="the weights take"):
        load_model(tiny_dir, device="cuda")
    assert loads == []


def test_a_spread_placement_loads_with_accelerate_and_computes_the_same(monkeypatch, tiny_dir):
    """``device_map="auto"`` with the planned per-device budgets reaches from_pretrained; on this CPU-only
    machine accelerate keeps every layer on the CPU, and the model computes what a plain load computes, through
    scoring and pruning too."""
    import diet.checkpoint
    from diet.devices import Placement
    from diet.pruning import apply_mask
    from diet.scoring import score

    plain = load_model(tiny_dir)
    seen = []
    real = diet.checkpoint.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(diet.checkpoint.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k) or real(*a, **k))
    monkeypatch.setattr(diet.checkpoint, "plan_placement",
                        lambda spec, need: Placement(torch.device("cpu"), max_memory={"cpu": 4 * GiB}))
    spread = load_model(tiny_dir, device="auto")
    assert seen[0]["device_map"] == "auto" and seen[0]["max_memory"] == {"cpu": 4 * GiB}
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(spread(ids).logits, plain(ids).logits, rtol=0, atol=0)

    cfg = ScoreConfig(groups=("mlp", "hidden"), batch_size=4)
    texts = TEXTS["colours"]
    got = {name: score(m, tiny_tokenizer(), texts, cfg, max_length=64, progress=False)[0]
           for name, m in (("plain", plain), ("spread", spread))}
    assert got["plain"].keys() == got["spread"].keys()
    for name, t in got["plain"].items():
        assert torch.equal(t, got["spread"][name]), name
    keep = {"mlp": [torch.arange(0, plain.config.intermediate_size, 2)] * plain.config.num_hidden_layers,
            "hidden": [torch.arange(0, plain.config.hidden_size, 2)]}
    width = plain.config.hidden_size
    for m in (plain, spread):
        apply_mask(m, keep)
    assert spread.config.hidden_size == width // 2
    torch.testing.assert_close(spread(ids).logits, plain(ids).logits, rtol=0, atol=0)
