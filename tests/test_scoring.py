"""Activation statistics, hooks, score_texts on tiny random models of every family, score files, fingerprints."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diet.versions

from diet.adapters import get_adapter
from diet.errors import DietError
from diet.groups import GROUPS
from diet.scorefile import MOMENTS, model_fingerprint, moment_name, read_moments, read_scores, split_scores, write_scores
from diet.scoring import ActivationStats, output_weight_norms, record_activations, score_texts
from tests.tiny import FAMILIES, tiny_model, tiny_tokenizer

TEXTS = ["the cat sat on the mat", "a", "question: why is the sky blue? answer: scattering",
         "one two three four five six seven eight nine ten", "zebra", "hello world, hello again"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _brute(x, mask, statistic):
    sel = x[mask]  # (N, D) real tokens only
    return sel.abs().mean(0) if statistic == "mean_abs" else sel.square().sum(0).sqrt()


@pytest.mark.parametrize("statistic", ["mean_abs", "l2"])
def test_stats_match_brute_force_and_ignore_padding(statistic):
    g = torch.Generator().manual_seed(1)
    stats = ActivationStats(12, statistic)
    xs, masks = [], []
    for b, t in [(3, 5), (2, 7), (4, 1)]:
        x = torch.randn(b, t, 12, generator=g)                     # (B, T, D)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]         # (B, T)
        x_padded = torch.where(mask[..., None], x, torch.full_like(x, 1e6))  # padding holds garbage
        stats.add_batch(x_padded, mask)
        xs.append(x[mask])
        masks.append(mask)
    flat = torch.cat(xs)                                           # (N, D)
    expected = _brute(flat[None], torch.ones(1, len(flat), dtype=torch.bool), statistic)
    assert stats.n_tokens == len(flat)
    torch.testing.assert_close(stats.finalize(), expected, rtol=1e-5, atol=1e-6)
    grouped = stats.finalize(n_groups=3)                           # (3,): 4 channels each
    if statistic == "mean_abs":
        want = expected.view(3, 4).mean(1)
    else:
        want = expected.square().view(3, 4).mean(1).sqrt()
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-6)
    moments = stats.moments()                                      # each (D,), of the signed activation
    torch.testing.assert_close(moments["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moments["var"], flat.var(0, correction=0), rtol=1e-5, atol=1e-6)
    assert moments["mean"].dtype == moments["var"].dtype == torch.float32


def test_stats_reject_bad_shapes():
    stats = ActivationStats(4)
    with pytest.raises(ValueError):
        stats.add_batch(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        stats.add_batch(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(DietError):
        stats.finalize()
    with pytest.raises(DietError):
        stats.moments()


def _hook_count(adapter):
    return sum(len(GROUPS[g].output_projection(adapter, i)._forward_pre_hooks)
               for g in ("mlp", "attention") for i in range(adapter.num_layers))


def test_hooks_removed_even_on_exception(model):
    adapter = get_adapter(model)
    with record_activations(model, adapter, ["mlp", "attention"]) as rec:
        assert _hook_count(adapter) == 2 * adapter.num_layers
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert rec.stats["mlp"][0].n_tokens == 3
    assert _hook_count(adapter) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with record_activations(model, adapter, ["mlp", "attention"]):
            raise RuntimeError("boom")
    assert _hook_count(adapter) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_score_texts_equals_unbatched_unpadded_reference(family, tokenizer):
    model = tiny_model(family)
    adapter = get_adapter(model)
    L, I, G = adapter.num_layers, GROUPS["mlp"].widths(adapter)[0], adapter.num_kv_heads(0)
    tensors, stats = score_texts(model, tokenizer, TEXTS, groups=["mlp", "attention"], statistic="mean_abs",
                                 weight_norm=False, batch_size=4, max_length=9, add_bos=True, progress=False)
    scores, moments = split_scores(tensors)
    assert scores["mlp"].shape == (L, I) and scores["attention"].shape == (L, G)
    channels = {"mlp": I, "attention": adapter.num_heads(0) * adapter.head_dim()}
    for g, d in channels.items():
        assert set(moments[g]) == set(MOMENTS)
        assert all(t.shape == (L, d) and t.dtype == torch.float32 for t in moments[g].values())
    assert scores["mlp"].dtype == torch.float32

    # reference: each text alone, no padding, activations collected by hand
    acts = {(g, i): [] for g in ("mlp", "attention") for i in range(L)}
    handles = [GROUPS[g].output_projection(adapter, i).register_forward_pre_hook(
        lambda m, a, key=(g, i): acts[key].append(a[0][0])) for g, i in acts]
    n_tokens = 0
    try:
        with torch.no_grad():
            for text in TEXTS:
                ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = ids[:9]
                n_tokens += len(ids)
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    assert stats == {"n_samples": len(TEXTS), "n_tokens": n_tokens}
    for i in range(L):
        mlp = torch.cat(acts[("mlp", i)]).abs().mean(0)                           # (I,)
        torch.testing.assert_close(scores["mlp"][i], mlp, rtol=1e-4, atol=1e-6)
        att = torch.cat(acts[("attention", i)]).abs().mean(0).view(G, -1).mean(1)  # (G,)
        torch.testing.assert_close(scores["attention"][i], att, rtol=1e-4, atol=1e-6)
        for g in channels:
            x = torch.cat(acts[(g, i)])                                            # (N, D)
            torch.testing.assert_close(moments[g]["mean"][i], x.mean(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(moments[g]["var"][i], x.var(0, correction=0), rtol=1e-4, atol=1e-6)


def test_score_texts_deterministic_and_weight_norm(model, tokenizer):
    adapter = get_adapter(model)
    kw = dict(groups=["mlp", "attention"], statistic="l2", batch_size=3, max_length=16, add_bos=False,
              progress=False, adapter=adapter)
    a, _ = score_texts(model, tokenizer, TEXTS, weight_norm=False, **kw)
    b, _ = score_texts(model, tokenizer, TEXTS, weight_norm=False, **kw)
    c, _ = score_texts(model, tokenizer, TEXTS, weight_norm=True, **kw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for g in ("mlp", "attention"):
        torch.testing.assert_close(c[g], (a[g].double() * output_weight_norms(adapter, g)).float())
        for m in MOMENTS:  # moments are of the activation alone
            assert torch.equal(c[moment_name(g, m)], a[moment_name(g, m)])
    down = adapter.mlp_projections(1)[1].weight                              # (H, I)
    torch.testing.assert_close(output_weight_norms(adapter, "mlp")[1].float(), down.detach().norm(dim=0))
    o = adapter.attention_projections(0)[3].weight.detach()                 # (H, 4 heads * 8)
    torch.testing.assert_close(output_weight_norms(adapter, "attention")[0, 1].float(), o[:, 16:].norm())
    assert not model.training


def _meta(fingerprint="f" * 64, task="arc_easy"):
    return {"model_fingerprint": fingerprint, "task": task, "task_data_hash": "d" * 64, "n_samples": 3,
            "n_tokens": 40, "statistic": "mean_abs", "weight_norm": False}


def test_score_texts_same_bytes_whatever_the_thread_count(tokenizer, tmp_path):
    # wide enough that the kernels split their work over threads (a plain forward of it moves in the last
    # bits between 1, 2 and 4 threads on an AVX-512 CPU)
    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    texts = [("the quick brown fox jumps over the lazy dog " * 8)[: 40 + 9 * i] for i in range(12)]
    kw = dict(groups=["mlp", "attention"], statistic="mean_abs", weight_norm=False, batch_size=3, max_length=128,
              add_bos=False, progress=False)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            tensors, _ = score_texts(model, tokenizer, texts, **kw)
            write_scores(tmp_path / f"t{n}.safetensors", tensors, _meta())
            assert torch.get_num_threads() == n            # the caller's thread count is restored
    finally:
        torch.set_num_threads(threads)
    one = (tmp_path / "t1.safetensors").read_bytes()
    assert one == (tmp_path / "t2.safetensors").read_bytes() == (tmp_path / "t4.safetensors").read_bytes()


def _with_moments(scores: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    out = dict(scores)
    for group, t in scores.items():
        for m in MOMENTS:
            out[moment_name(group, m)] = torch.rand(t.shape[0], 4 * t.shape[1], generator=g)  # (L, D)
    return out


def test_score_files_byte_identical_and_roundtrip(tmp_path):
    scores = _with_moments({"mlp": torch.rand(3, 8), "attention": torch.rand(3, 2)})
    write_scores(tmp_path / "a" / "arc_easy.safetensors", scores, _meta())
    write_scores(tmp_path / "b" / "arc_easy.safetensors", {k: scores[k] for k in sorted(scores, reverse=True)}, _meta())
    for name in ["arc_easy.safetensors", "arc_easy.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a second process too: safetensors writes several metadata entries in hash order, so one entry is used
    code = ("import sys, torch; from safetensors.torch import load_file; from diet.scorefile import write_scores; "
            "import json; s = load_file(sys.argv[1]); m = json.load(open(sys.argv[2])); "
            "write_scores(sys.argv[3], s, {k: m[k] for k in "
            "['model_fingerprint','task','task_data_hash','n_samples','n_tokens','statistic','weight_norm']})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a" / "arc_easy.safetensors"),
                    str(tmp_path / "a" / "arc_easy.json"), str(tmp_path / "c" / "arc_easy.safetensors")],
                   check=True, cwd=Path(__file__).resolve().parent.parent)
    first = (tmp_path / "a" / "arc_easy.safetensors").read_bytes()
    assert (tmp_path / "c" / "arc_easy.safetensors").read_bytes() == first
    loaded, meta = read_scores(tmp_path / "a" / "arc_easy.safetensors", expect_fingerprint="f" * 64)
    assert set(loaded) == {"mlp", "attention"} and torch.equal(loaded["mlp"], scores["mlp"])
    moments = read_moments(tmp_path / "a" / "arc_easy.safetensors", expect_fingerprint="f" * 64)
    assert set(moments) == {"mlp", "attention"}
    assert torch.equal(moments["attention"]["var"], scores["attention.var"])
    assert set(read_moments(tmp_path / "a" / "arc_easy.safetensors", groups=["mlp"])) == {"mlp"}
    import diet

    assert meta["score_version"] == diet.versions.SCORE and meta["n_tokens"] == 40 and meta["weight_norm"] is False


def test_read_scores_refuses_other_model(tmp_path):
    path = tmp_path / "boolq.safetensors"
    write_scores(path, {"mlp": torch.rand(2, 4)}, _meta("a" * 64, "boolq"))
    with pytest.raises(DietError) as err:
        read_scores(path, expect_fingerprint="b" * 64)
    msg = str(err.value)
    assert "a" * 64 in msg and "b" * 64 in msg and "score task 'boolq' again on the current model" in msg
    assert err.value.artifact == "task_scores:boolq"
    with pytest.raises(ValueError):
        write_scores(path, {"mlp": torch.rand(2, 4)}, {"task": "boolq"})
    with pytest.raises(ValueError, match="without the group"):
        write_scores(path, {"mlp": torch.rand(2, 4), "attention.mean": torch.rand(2, 8)}, _meta())


def test_read_moments_refuses_file_without_them(tmp_path):
    path = tmp_path / "boolq.safetensors"
    write_scores(path, {"mlp": torch.rand(2, 4)}, _meta(task="boolq"))       # as written before moments
    assert set(read_scores(path)[0]) == {"mlp"}
    with pytest.raises(DietError, match="no activation moments for mlp") as err:
        read_moments(path)
    assert "score task 'boolq' again (with the group in score.groups)" in err.value.fix
    assert err.value.artifact == "task_scores:boolq"


def test_fingerprint_stable_across_copies(model, tmp_path):
    model.save_pretrained(tmp_path / "m1")
    shutil.copytree(tmp_path / "m1", tmp_path / "copy")
    fp = model_fingerprint(tmp_path / "m1")
    assert len(fp) == 64 and fp == model_fingerprint(tmp_path / "copy")
    from safetensors.torch import load_file, save_file

    weights = next((tmp_path / "copy").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_fingerprint(tmp_path / "copy") != fp
    with pytest.raises(DietError):
        model_fingerprint(tmp_path / "nothing")


def test_scoring_takes_the_bos_rule_of_evaluation():
    """A tokenizer that prepends BOS by default (Llama-2/3 style) gets BOS in calibration too, as in
    evaluation and perplexity (diet.tokens.resolve_add_bos): one more token per text, the same sequences."""
    from diet.config import ScoreConfig
    from diet.scoring import score
    from tests.test_evaluation import bos_tokenizer

    model, plain, with_bos = tiny_model("llama"), tiny_tokenizer(), bos_tokenizer()
    texts = ["the quick brown fox", "a small model"]
    cfg = ScoreConfig(groups=("mlp",), batch_size=2)
    _, stats_plain = score(model, plain, texts, cfg, max_length=64, progress=False)
    _, stats_bos = score(model, with_bos, texts, cfg, max_length=64, progress=False)
    lengths = [len(plain(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert stats_plain["n_tokens"] == sum(lengths)
    assert stats_bos["n_tokens"] == sum(lengths) + len(texts)


def test_import_diet_loads_no_torch():
    """The configuration, error and I/O layers serve tools that never run a model (the flows)."""
    code = ("import sys, diet, diet.config, diet.errors, diet.io; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad; "
            "assert callable(diet.prune)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_scores_are_the_residual_stream_entering_its_norms(family, tokenizer, tmp_path):
    """hidden: one row of H scores, the mean |x| of the residual stream over every norm that reads it (each
    layer's pre-norms and the final norm) and every real token; its moments are (1, H) too, and the (1, H)
    tensors go through a score file unchanged."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    H = adapter.hidden_size()
    tensors, _ = score_texts(model, tokenizer, TEXTS, groups=["mlp", "hidden"], statistic="mean_abs",
                             weight_norm=False, batch_size=4, max_length=9, add_bos=True, progress=False)
    scores, moments = split_scores(tensors)
    assert scores["hidden"].shape == (1, H) and scores["mlp"].shape == (adapter.num_layers, 64)
    assert all(t.shape == (1, H) for t in moments["hidden"].values())

    sites = [n for i in range(adapter.num_layers) for n in adapter.residual_norms(i)] + [adapter.final_norm()]
    acts = []
    handles = [m.register_forward_pre_hook(lambda m, a: acts.append(a[0][0])) for m in sites]  # each (T, H)
    try:
        with torch.no_grad():
            for text in TEXTS:
                ids = ([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])[:9]
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    flat = torch.cat(acts)                                                   # (sites * tokens, H)
    torch.testing.assert_close(scores["hidden"][0], flat.abs().mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(moments["hidden"]["mean"][0], flat.mean(0), rtol=1e-4, atol=1e-5)
    with_norms, _ = score_texts(model, tokenizer, TEXTS[:2], groups=["hidden"], statistic="mean_abs",
                                weight_norm=True, batch_size=4, max_length=9, add_bos=True, progress=False)
    plain, _ = score_texts(model, tokenizer, TEXTS[:2], groups=["hidden"], statistic="mean_abs",
                           weight_norm=False, batch_size=4, max_length=9, add_bos=True, progress=False)
    readers = output_weight_norms(adapter, "hidden")                         # (1, H)
    assert readers.shape == (1, H)
    torch.testing.assert_close(with_norms["hidden"], (plain["hidden"].double() * readers).float())
    path = tmp_path / "t.safetensors"
    write_scores(path, tensors, _meta())
    back, _ = read_scores(path)
    assert torch.equal(back["hidden"], scores["hidden"])
    assert torch.equal(read_moments(path, groups=["hidden"])["hidden"]["var"], moments["hidden"]["var"])


def test_batches_run_in_workers_without_gradients_when_the_caller_has_none():
    from diet.parallel import map_batches

    threads = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            seen += list(map_batches(lambda b: torch.is_grad_enabled(), [0, 1, 2, 3], "cpu"))
        seen += list(map_batches(lambda b: torch.is_grad_enabled(), [0, 1], "cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [False] * 4 + [True] * 2
