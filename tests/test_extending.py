"""A merge method added from outside the package (docs/extending.md): one file and one ``register`` call.

The method lives in a module written into ``tmp_path``; nothing else in the project is edited. It ranks MLP
channels by NEGATIVE weight magnitude (the weakest kept first), so its mask is the opposite of ``magnitude``'s:
config validation accepts its name, and merge, select and prune follow its priorities on a tiny random model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diet.config import MergeConfig, Params, PruneConfig, SelectConfig, load_params
from diet.errors import ConfigError
from diet.registry import MERGE_METHODS, MergeMethod, Registry
from tests.tiny import tiny_model, tiny_tokenizer

NAME = "neg_magnitude"
MODULE = "diet_ext_neg_magnitude"   # a module of tmp_path, not of the project
SOURCE = '''
    """A merge method outside the package: the dimensions with the smallest weight norms are kept first."""


    def order(m):
        """m: the group's diet.merge.MergeInput; returns sort keys (L, W), higher = kept first."""
        return -m.normalized("magnitude")
'''
SELECT = SelectConfig(min_keep=0.0, multiple=1)     # no per-layer floor: the mask is the global top of the order
PRUNE = PruneConfig(sparsity=0.2, groups=("mlp",))


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The method's file in tmp_path, registered for this test only."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    MERGE_METHODS.register(NAME, f"{MODULE}:order", inputs=("magnitude",))
    try:
        yield
    finally:
        MERGE_METHODS.unregister(NAME)
        sys.modules.pop(MODULE, None)


def test_config_refuses_the_name_until_it_is_registered(tmp_path):
    with pytest.raises(ConfigError) as err:
        MergeConfig(method=NAME).validate()
    assert err.value.problem == f"merge.method = {NAME!r} is not supported"
    assert err.value.fix == "use one of: " + ", ".join(MERGE_METHODS.names()) and "wanda_sp" in err.value.fix


def test_config_accepts_a_registered_method_and_imports_it_only_on_use(registered, tmp_path):
    assert NAME in MERGE_METHODS.names() and MERGE_METHODS.facts(NAME).inputs == ("magnitude",)
    assert not MERGE_METHODS.facts(NAME).uses_tasks and not MERGE_METHODS.facts(NAME).field_baseline
    MergeConfig(method=NAME).validate()
    assert Params.from_dict({"merge": {"method": NAME}}).merge.method == NAME
    (tmp_path / "params.yaml").write_text(f"tasks: [t1, t2]\nmerge:\n  method: {NAME}\n")
    assert load_params(tmp_path / "params.yaml").merge.method == NAME
    assert MODULE not in sys.modules                       # validation reads names and facts, never the code
    assert MERGE_METHODS.get(NAME).__module__ == MODULE


def _mlp_keep(mask) -> torch.Tensor:
    """The mask's kept MLP channels as a bool (L, W)."""
    keep = torch.zeros(len(mask.base_widths["mlp"]), max(mask.base_widths["mlp"]), dtype=torch.bool)
    for layer, kept in enumerate(mask.keep_tensors()["mlp"]):
        keep[layer, kept] = True
    return keep


def test_merge_select_and_prune_follow_the_new_methods_priorities(registered):
    from diet.api import apply, geometry, plan
    from diet.merge import magnitude_scores
    from diet.pruning import zero_mask

    model = tiny_model("llama")
    geo = geometry(model, ("mlp",))
    g = torch.Generator().manual_seed(0)
    task_scores = {t: {"mlp": torch.rand(3, 64, generator=g)} for t in ("t1", "t2")}   # each (L, W)
    mag = magnitude_scores(model, groups=["mlp"])["mlp"]                                # (L, W)
    masks = {}
    for method in (NAME, "magnitude"):
        merged, masks[method] = plan(task_scores, geo, merge_cfg=MergeConfig(method=method, normalize="none"),
                                     prune_cfg=PRUNE, select_cfg=SELECT, magnitude={"mlp": mag})
        if method == NAME:   # the merged order is the new method's: weakest first, ties to the lowest position
            order = torch.argsort(merged["mlp"]["priority"].reshape(-1), descending=True, stable=True)
            assert torch.equal(order, torch.argsort(mag.reshape(-1), stable=True))
    neg, pos = _mlp_keep(masks[NAME]), _mlp_keep(masks["magnitude"])
    assert neg.sum() == pos.sum() < neg.numel()                        # the same budget, some channels removed
    assert mag[neg].max() <= mag[~neg].min()                           # it keeps the weakest channels
    assert mag[pos].min() >= mag[~pos].max()                           # magnitude keeps the strongest
    assert not torch.equal(neg, pos)

    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 2]])
    keep = masks[NAME].keep_tensors()
    reference = zero_mask(model, keep)(ids).logits                     # dense, the removed channels zeroed
    pruned = apply(model, masks[NAME])
    assert [pruned.model.layers[i].mlp.down_proj.in_features for i in range(3)] == masks[NAME].widths["mlp"]
    torch.testing.assert_close(pruned(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_the_api_gathers_the_inputs_the_entry_names(registered):
    """``diet.prune`` reads the entry's facts: a method that reads ``magnitude`` gets the weight norms, and needs
    no generic text."""
    import diet
    from diet.merge import magnitude_scores

    texts = {"t1": ["the quick brown fox jumps over the lazy dog"], "t2": ["pack my box with five dozen jugs"]}
    model = tiny_model("llama")
    mag = magnitude_scores(model, groups=["mlp"])["mlp"]
    _, mask = diet.prune(model, tiny_tokenizer(), texts, 0.2, select_cfg=SELECT, progress=False, max_length=32,
                         merge_cfg=MergeConfig(method=NAME, normalize="none"))
    keep = _mlp_keep(mask)
    assert mag[keep].max() <= mag[~keep].min()


def test_a_registered_method_says_what_it_lacks(registered):
    from diet.merge import merge

    with pytest.raises(ConfigError, match=f"merge.method {NAME} needs weight-magnitude scores"):
        merge({"t1": {"mlp": torch.rand(2, 4)}}, method=NAME, normalize="none", weights={}, budget={"mlp": 3})


def test_registry_refuses_bad_entries():
    reg = Registry("thing.kind", MergeMethod, {"a": ("diet.merge_methods:vote", MergeMethod(inputs=("tasks",)))})
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("a", "x:y")
    with pytest.raises(ConfigError, match="not 'module:object'"):
        reg.register("b", "no_colon")
    with pytest.raises(ConfigError, match="is not a name"):
        reg.register("vote+bias", "x:y")          # '+' joins a method and its recovery in the flows
    with pytest.raises(ConfigError, match="unknown inputs"):
        reg.register("b", "x:y", inputs=("labels",))
    with pytest.raises(ConfigError, match="channels"):
        reg.register("b", "x:y", inputs=("moments",))   # a moments method names its channel metric
    with pytest.raises(ConfigError) as err:
        reg.get("c")
    assert err.value.problem == "thing.kind = 'c' is not supported" and err.value.fix == "use one of: a"
    assert reg.names() == ("a",) and "b" not in reg


def test_the_registry_and_its_built_in_facts_load_no_torch():
    code = ("import sys; from diet.registry import MERGE_METHODS as M; "
            "assert M.names(lambda f: f.uses_tasks) == ('vote', 'mean', 'rank'); "
            "assert M.names(lambda f: f.field_baseline) == ('wanda_sp', 'flap'); "
            "bad = [m for m in ('torch', 'transformers', 'diet.merge', 'diet.merge_methods') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
