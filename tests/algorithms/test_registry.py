from __future__ import annotations

import dataclasses

import pytest

from posttrain.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
    compute_grpo_advantages,
    get_advantage_estimator,
    get_policy_loss,
    ppo_clip_loss,
)
from posttrain.config.schema import AlgorithmConfig
from posttrain.errors import ConfigError, PosttrainError


def test_register_get_names():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    @reg.register("a")
    def a():
        return "a"

    assert reg.get("a") is a and reg.get("b") is b
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg
    assert len(reg) == 2


def test_duplicate_name_is_rejected():
    reg = Registry("widget")
    reg.register("x")(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(lambda: None)


def test_unknown_name_lists_registered_names_and_nearest_match():
    reg = Registry("widget")
    for name in ("alpha", "beta", "gamma"):
        reg.register(name)(lambda: None)
    with pytest.raises(ConfigError) as info:
        reg.get("betta")
    message = str(info.value)
    assert "Unknown widget 'betta'" in message
    assert "Did you mean 'beta'?" in message
    assert "alpha, beta, gamma" in message
    assert isinstance(info.value, PosttrainError)


def test_unknown_name_without_close_match_has_no_hint():
    reg = Registry("widget")
    reg.register("alpha")(lambda: None)
    with pytest.raises(ConfigError) as info:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "alpha" in str(info.value)


def test_builtin_getters():
    assert get_advantage_estimator("grpo") is compute_grpo_advantages
    assert get_policy_loss("ppo_clip") is ppo_clip_loss
    with pytest.raises(ConfigError, match="Did you mean 'grpo'"):
        get_advantage_estimator("grp")
    with pytest.raises(ConfigError, match="ppo_clip"):
        get_policy_loss("ppo")


def test_config_choices_are_the_registered_names():
    # One list: the schema offers what the registries hold (a new registered loss is a valid choice).
    from posttrain.config.fields import field_choices
    from posttrain.config.ppo_schema import PPOAlgorithmConfig

    choices = {f.name: field_choices(f) for f in dataclasses.fields(AlgorithmConfig)}
    assert set(choices["advantage"]) == set(ADVANTAGE_ESTIMATORS.names()) - {"gae"}  # gae needs a critic: ppo
    assert set(choices["policy_loss"]) == set(POLICY_LOSSES.names())
    assert set(choices["loss_agg_mode"]) == set(LOSS_AGGREGATIONS.names())
    assert set(choices["kl_estimator"]) == set(KL_ESTIMATORS.names())
    ppo = {f.name: field_choices(f) for f in dataclasses.fields(PPOAlgorithmConfig)}
    assert ppo["advantage"] == ("gae",)


def test_a_newly_registered_policy_loss_is_a_valid_config_choice():
    from posttrain.config.loader import load_config
    from posttrain.config.schema import GRPOConfig
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.policy_loss='my_loss' is not allowed"):
        load_config(GRPOConfig, overrides=["algorithm.policy_loss=my_loss"])
    POLICY_LOSSES.register("my_loss")(lambda *a, **k: None)
    try:
        assert load_config(GRPOConfig, overrides=["algorithm.policy_loss=my_loss"]).algorithm.policy_loss == "my_loss"
    finally:
        del POLICY_LOSSES._entries["my_loss"], POLICY_LOSSES._properties["my_loss"]


def test_entries_carry_properties_by_name_or_function():
    from posttrain.algorithms import ADVANTAGE_ESTIMATORS, folds_kl_into_reward, get_advantage_estimator

    assert folds_kl_into_reward("reinforce_plus_plus") and folds_kl_into_reward("gae")
    assert not folds_kl_into_reward("grpo")
    assert folds_kl_into_reward(get_advantage_estimator("reinforce_plus_plus_baseline"))
    assert ADVANTAGE_ESTIMATORS.property("rloo", "folds_kl_into_reward", "unset") == "unset"
    assert ADVANTAGE_ESTIMATORS.property(len, "folds_kl_into_reward", False) is False  # not registered
