"""One typed config: YAML, validation messages that name the field, and overrides."""

import pytest

from ray_pipeline.config import Config
from ray_pipeline.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cluster:\n  k: [20, 50]\nselect:\n  budgets: ['1%', 0.05, 300]\nseed: 4\n")
    cfg = Config.from_yaml(p)
    assert cfg.cluster.k == (20, 50) and cfg.seed == 4
    assert cfg.select.resolve_budgets(10_000) == (100, 500, 300)


@pytest.mark.parametrize("raw, field, allowed", [
    ({"clusters": {}}, "clusters", "allowed in the top level"),
    ({"cluster": {"kk": 3}}, "cluster.kk", "allowed in cluster"),
    ({"cluster": {"k": ["a"]}}, "cluster.k", "ratio of the budget: 'M', 'M/2'"),
    ({"cluster": {"k": [0]}}, "cluster.k", "an int >= 1"),
    ({"cluster": {"k": ["M/0"]}}, "cluster.k", "an int >= 1"),
    ({"cluster": {"k": [1.5]}}, "cluster.k", "int or str"),
    ({"select": {"outlier_quantile": 0.7}}, "select.outlier_quantile", "[0, 0.5)"),
    ({"cluster": {"k": [5, 5]}}, "cluster.k", "distinct"),
    ({"select": {"budgets": [0]}}, "select.budgets", "count >= 1"),
    ({"select": {"budgets": [1.5]}}, "select.budgets", "fraction in (0, 1]"),
    ({"select": {"budgets": ["x%"]}}, "select.budgets", "percentage"),
    ({"select": {"budgets": []}}, "select.budgets", "non-empty"),
    ({"select": {"budgets": [100, 100]}}, "select.budgets", "distinct"),
    ({"embed": {"pooling": "max"}}, "embed.pooling", "'mean' | 'cls' | 'last'"),
    ({"seed": "one"}, "seed", "an int"),
    ({"seed": True}, "seed", "an int"),
    ({"data": {"text_column": "a", "text_template": "{b}"}}, "data.text_template", "one or the other"),
])
def test_bad_values_name_the_field_and_what_is_allowed(raw, field, allowed):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(raw)
    assert field in str(e.value) and allowed in str(e.value)


def test_budget_above_pool_or_colliding_after_resolution():
    cfg = Config.from_dict({"select": {"budgets": [500]}})
    with pytest.raises(ConfigError, match="more than the pool's 100"):
        cfg.select.resolve_budgets(100)
    cfg = Config.from_dict({"select": {"budgets": ["1%", 1]}})
    with pytest.raises(ConfigError, match="duplicate sample counts"):
        cfg.select.resolve_budgets(100)


def test_overrides_parse_yaml_values_and_revalidate():
    cfg = Config().override(["cluster.k=[10, 20]", "seed=3", "select.budgets=['2%']"])
    assert cfg.cluster.k == (10, 20) and cfg.seed == 3 and cfg.select.budgets == ("2%",)
    with pytest.raises(ConfigError, match="cluster.niter"):
        Config().override(["cluster.niter=0"])
    with pytest.raises(ConfigError, match=r"cluster.leaf.*an int >= 1"):
        Config().override(["cluster.leaf=0"])
    with pytest.raises(ConfigError, match="not a config section"):
        Config().override(["seed.x=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        Config().override(["seed"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(lst)


def test_k_relative_to_the_budget():
    cfg = Config.from_dict({"cluster": {"k": ["M/4", "M", 30, "0.5M"]}, "select": {"budgets": [40, "2%"]}})
    # n = 1000: M = 40 and 20; K = M/4, M, 30, M/2 for each, deduplicated
    assert cfg.candidate_grid(1000) == [(5, 20), (10, 20), (10, 40), (20, 20), (20, 40), (30, 20), (30, 40),
                                         (40, 40)]
    with pytest.raises(ConfigError, match="choose K <= 25"):
        Config.from_dict({"cluster": {"k": [30]}, "select": {"budgets": [10]}}).candidate_grid(25)


def test_lora_is_on_by_default_for_causal_lms_only_and_checked():
    from ray_pipeline.finetune.task import task_for

    def uses_lora(ft):
        return task_for(ft.task).uses_lora(ft)

    assert uses_lora(Config.from_dict({"finetune": {"task": "instruction"}}).finetune)
    assert not uses_lora(Config.from_dict({"finetune": {"task": "classification"}}).finetune)
    assert uses_lora(Config.from_dict({"finetune": {"lora": {"enabled": True}}}).finetune)
    cfg = Config.from_dict({"finetune": {"task": "instruction", "lora": {"enabled": False, "r": 4,
                                                                        "target_modules": ["q_proj", "v_proj"]}}})
    assert not uses_lora(cfg.finetune) and cfg.finetune.lora.target_modules == ("q_proj", "v_proj")
    for bad, match in (({"r": 0}, "finetune.lora.r"), ({"lora_dropout": 1.0}, "finetune.lora.lora_dropout"),
                       ({"rank": 8}, "finetune.lora.r"),
                       ({"target_modules": []}, "finetune.lora.target_modules"), ({"bogus": 8}, "allowed in")):
        with pytest.raises(ConfigError, match=match):
            Config.from_dict({"finetune": {"lora": bad}})


def test_flat_finetune_keys_are_refused_with_their_new_place():
    for raw, new in (({"eval_path": "h.csv"}, "finetune.heldout.eval_path"), ({"lr": 0.1}, "finetune.train.lr"),
                     ({"asha_grace_period": 2}, "finetune.sweep.grace_period"),
                     ({"num_workers": 2}, "finetune.resources.num_workers"),
                     ({"proxy": "coverage"}, "finetune.proxy.kind")):
        with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
            Config.from_dict({"finetune": raw})
    with pytest.raises(ConfigError, match=r"finetune\.train\.max_steps"):
        Config().override(["finetune.max_steps=3"])
    cfg = Config().override(["finetune.train.max_steps=30", "finetune.sweep.grace_period=2"])
    assert cfg.finetune.train.max_steps == 30 and cfg.finetune.sweep.grace_period == 2


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `lr: 1e-4` as the string '1e-4'; a float field takes it as the number
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  train:\n    lr: 1e-4\n")
    assert Config.from_yaml(path).finetune.train.lr == 1e-4
    assert Config().override(["finetune.train.lr=5E-3"]).finetune.train.lr == 5e-3
    with pytest.raises(ConfigError, match="finetune.train.lr"):
        Config().override(["finetune.train.lr=1e-4x"])


@pytest.mark.parametrize("value, accepted", [(0, True), (3, True), (-1, False), ("two", False), (True, False)])
def test_sweep_max_retries_is_an_int_of_at_least_zero(value, accepted):
    assert Config().finetune.sweep.max_retries == 2  # a spot worker lost twice still finishes its trial
    raw = {"finetune": {"sweep": {"max_retries": value}}}
    if accepted:
        assert Config.from_dict(raw).finetune.sweep.max_retries == value
        return
    with pytest.raises(ConfigError, match="finetune.sweep.max_retries"):
        Config.from_dict(raw)


def test_a_bad_max_retries_on_the_command_line_is_one_line_and_exit_2(capsys):
    from ray_pipeline.cli import main

    assert main(["run", "--set", "finetune.sweep.max_retries=-1", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ray-pipeline: error: config field 'finetune.sweep.max_retries' is -1; allowed: an int >= 0 "
                   "(0: a failed trial is not run again)"], err
