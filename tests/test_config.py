import pytest
import yaml

from diet.config import Params, load_params
from diet.errors import ConfigError


def test_shipped_params_validate(project_root):
    p = load_params(project_root / "params.yaml")
    assert p.model.source == "smollm2"
    assert len(p.tasks) == 8
    assert 0 < p.prune.sparsity < 1


def test_defaults_roundtrip():
    p = Params.from_dict({})
    assert Params.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("data, needle", [
    ({"prune": {"sparsty": 0.2}}, "prune.sparsity"),          # typo gets a suggestion
    ({"prunes": {}}, "prune"),                                 # unknown section
    ({"score": {"nonsense": 1}}, "score.nonsense"),
])
def test_unknown_keys_are_refused_with_a_hint(data, needle):
    with pytest.raises(ConfigError) as e:
        Params.from_dict(data)
    assert needle in str(e.value)
    assert e.value.fix


@pytest.mark.parametrize("data", [
    {"prune": {"sparsity": 0.0}}, {"prune": {"sparsity": 1.0}}, {"prune": {"sparsity": -0.1}},
    {"prune": {"sparsity": "high"}}, {"prune": {"groups": ["embedding"]}}, {"merge": {"method": "best"}},
    {"score": {"statistic": "max"}}, {"select": {"layout": "diagonal"}}, {"calibration": {"n_samples": 0}},
    {"tasks": []}, {"tasks": "arc_easy"}, {"tasks": ["a", "a"]}, {"evaluate": {"limit": -5}},
    {"merge": {"weights": {"boolq": -1}}}, {"prune": {"recover": "retrain"}},
    {"prune": {"recover": "bias", "groups": ["mlp", "attention"]}, "score": {"groups": ["mlp"]}},
])
def test_bad_values_are_refused(data):
    with pytest.raises(ConfigError) as e:
        Params.from_dict(data)
    assert e.value.fix, "every config error says how to fix it"


def test_sparsity_message_names_the_range():
    with pytest.raises(ConfigError, match=r"is not a number in \(0, 1\)"):
        Params.from_dict({"prune": {"sparsity": 1.5}})


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"tasks": ["t1"], "prune": {"sparsity": 0.3}}))
    assert load_params(ok).prune.sparsity == 0.3


def test_recovery_and_new_methods_accepted():
    params = Params.from_dict({"prune": {"recover": "bias"}, "merge": {"method": "flap"}})
    assert params.prune.recover == "bias" and params.merge.method == "flap"
    assert Params.from_dict({}).prune.recover == "none"
    assert Params.from_dict({"merge": {"method": "wanda_sp"}}).merge.method == "wanda_sp"


def test_select_constraints_per_group():
    select = {"multiple": {"mlp": 8, "attention": 1}, "min_keep": {"mlp": 0.05, "attention": 0.34}}
    p = Params.from_dict({"prune": {"groups": ["mlp", "attention"]}, "select": select})
    assert p.select.multiple_for("attention") == 1 and p.select.multiple_for("mlp") == 8
    assert p.select.min_keep_for("attention") == 0.34
    assert Params.from_dict(p.to_dict()) == p
    scalar = Params.from_dict({"select": {"multiple": 4}})
    assert scalar.select.multiple_for("mlp") == scalar.select.multiple_for("attention") == 4


@pytest.mark.parametrize("select, prune_groups, needles", [
    ({"multiple": {"mlp": 8, "embedding": 1}}, ["mlp"], ("unknown group 'embedding'", "mlp, attention, hidden")),
    ({"min_keep": {"attention": 1.0}}, ["mlp"], ("select.min_keep.attention = 1.0 must be in [0, 1)",)),
    ({"multiple": {"mlp": 2.5}}, ["mlp"], ("select.multiple.mlp = 2.5 must be a positive integer",)),
    ({"multiple": {"mlp": 8}}, ["mlp", "attention"], ("none for attention", "add attention: <value>")),
    ({"min_keep": {"attention": 0.3}}, ["mlp"], ("none for mlp",)),
])
def test_select_constraints_per_group_are_checked(select, prune_groups, needles):
    with pytest.raises(ConfigError) as e:
        Params.from_dict({"prune": {"groups": prune_groups}, "select": select})
    for needle in needles:
        assert needle in str(e.value)
    assert e.value.fix


SCORE_ALL = {"groups": ["mlp", "attention", "hidden"]}


def test_hidden_group_combines_with_the_others():
    p = Params.from_dict({"score": SCORE_ALL, "prune": {"groups": ["mlp", "attention", "hidden"]},
                          "select": {"multiple": {"mlp": 8, "attention": 1, "hidden": 64}}})
    assert p.prune.groups == ("mlp", "attention", "hidden") and p.select.multiple_for("hidden") == 64


@pytest.mark.parametrize("data, needles", [
    ({"prune": {"groups": ["mlp", "hidden"]}}, ("hidden, which score.groups does not score", "add hidden to score.groups")),
    ({"score": SCORE_ALL, "prune": {"groups": ["mlp", "hidden"], "recover": "bias"}},
     ("cannot hold the removed hidden dimensions", "prune.recover: none", "prune.groups: ['mlp']")),
    ({"score": SCORE_ALL, "prune": {"groups": ["mlp", "hidden"]}, "select": {"multiple": {"mlp": 8}}},
     ("none for hidden", "add hidden: <value>")),
])
def test_hidden_group_bad_combinations_fail_at_params_load(data, needles):
    with pytest.raises(ConfigError) as e:
        Params.from_dict(data)
    for needle in needles:
        assert needle in str(e.value)
