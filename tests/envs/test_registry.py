from __future__ import annotations

import pytest

from posttrain.envs.base import Environment
from posttrain.envs.math_env import MathEnvironment
from posttrain.envs.registry import ENVIRONMENTS, check_env_kwargs, check_required_metadata, resolve_env_class
from posttrain.errors import ConfigError


def test_builtin_name_and_import_path():
    assert ENVIRONMENTS["math"] == "posttrain.envs.math_env.MathEnvironment"
    assert resolve_env_class("math") is MathEnvironment
    assert resolve_env_class("posttrain.envs.math_env.MathEnvironment") is MathEnvironment
    from envs.faulty_envs import ScriptedEnv

    assert resolve_env_class("envs.faulty_envs.ScriptedEnv") is ScriptedEnv


def test_unknown_name_lists_builtins_and_nearest():
    with pytest.raises(ConfigError) as e:
        resolve_env_class("maht")
    msg = str(e.value)
    assert "'maht'" in msg and "Did you mean 'math'?" in msg
    assert "Built-in environments: " + ", ".join(repr(n) for n in sorted(ENVIRONMENTS)) in msg
    assert {"math", "calculator", "code"} <= set(ENVIRONMENTS)
    assert "package.module.Class" in msg


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_name(bad):
    with pytest.raises(ConfigError, match="empty"):
        resolve_env_class(bad)


def test_module_not_importable():
    with pytest.raises(ConfigError) as e:
        resolve_env_class("no_such_pkg_xyz.envs.MyEnv")
    msg = str(e.value)
    assert "cannot import module 'no_such_pkg_xyz.envs'" in msg
    assert "ModuleNotFoundError" in msg and "PYTHONPATH" in msg


def test_missing_attribute_lists_environment_classes():
    with pytest.raises(ConfigError) as e:
        resolve_env_class("envs.faulty_envs.ScriptedEnvv")
    msg = str(e.value)
    assert "has no attribute 'ScriptedEnvv'" in msg
    assert "Did you mean 'ScriptedEnv'?" in msg
    listed = msg.split("Environment subclasses in that module:")[1]
    assert "BrokenInitEnv" in listed and "ScriptedEnv" in listed


@pytest.mark.parametrize("attr", ["NotAnEnv", "not_a_class"])
def test_not_an_environment_subclass(attr):
    with pytest.raises(ConfigError, match="must be a class that subclasses posttrain.envs.base.Environment"):
        resolve_env_class(f"envs.faulty_envs.{attr}")


def test_check_env_kwargs_accepts_valid():
    check_env_kwargs(MathEnvironment, {})
    check_env_kwargs(MathEnvironment, {"format_reward": 0.0, "answer_extraction": "boxed"})


def test_check_env_kwargs_unknown_with_nearest():
    with pytest.raises(ConfigError) as e:
        check_env_kwargs(MathEnvironment, {"format_rewrd": 0.2, "zzz": 1})
    msg = str(e.value)
    assert "'format_rewrd' Did you mean 'format_reward'?" in msg
    assert "'zzz'" in msg and "Accepted arguments: format_reward, answer_extraction" in msg


def test_check_env_kwargs_var_keyword_and_required():
    class AnyKwargs(Environment):
        def __init__(self, **kwargs):
            pass

    class Needs(Environment):
        def __init__(self, path: str, *, k: int = 1):
            pass

    check_env_kwargs(AnyKwargs, {"anything": 1})
    check_env_kwargs(Needs, {"path": "x", "k": 2})
    with pytest.raises(ConfigError, match="requires the arguments path"):
        check_env_kwargs(Needs, {"k": 2})


def test_required_metadata_declared_on_environments():
    assert Environment.required_metadata == ()
    assert MathEnvironment.required_metadata == ("expected_answer",)


def test_check_required_metadata_passes_and_ignores_environments_without_requirements():
    from posttrain.data.example import PromptExample

    rows = [PromptExample(messages=[], metadata={"expected_answer": "4", "id": 1})] * 3
    check_required_metadata(MathEnvironment, rows, "training prompts")
    check_required_metadata(Environment, [PromptExample(messages=[])], "training prompts")
    check_required_metadata(MathEnvironment, [], "validation prompts")  # nothing to check


def test_check_required_metadata_names_env_key_count_columns_and_fix():
    from posttrain.data.example import PromptExample

    rows = [
        PromptExample(messages=[], metadata={"question_id": 1, "answer": "3"}),
        PromptExample(messages=[], metadata={"question_id": 2, "expected_answer": "4"}),
        PromptExample(messages=[], metadata={"question_id": 3, "answer": "5", "expected_answer": None}),
    ]
    with pytest.raises(ConfigError) as e:
        check_required_metadata(MathEnvironment, rows, "validation prompts")
    msg = str(e.value)
    assert "MathEnvironment" in msg and "'expected_answer'" in msg
    assert "2 of 3 validation prompts lack it" in msg
    assert "'answer', 'expected_answer', 'question_id'" in msg
    assert "data.answer_column=answer" in msg


def test_check_required_metadata_other_keys_and_plain_dicts():
    class NeedsCity(Environment):
        required_metadata = ("city", "units")

    with pytest.raises(ConfigError) as e:
        check_required_metadata(NeedsCity, [{"city": "Oslo"}, {}], "training prompts")
    msg = str(e.value)
    assert "NeedsCity" in msg and "'units'" in msg and "2 of 2 training prompts" in msg
    assert "'city'" in msg and "1 of 2 training prompts" in msg
    assert "Add a 'units' column" in msg and "data.answer_column" not in msg

    class SingleString(Environment):
        required_metadata = "city"  # a common slip for ("city",)

    check_required_metadata(SingleString, [{"city": "Oslo"}], "training prompts")
    with pytest.raises(ConfigError, match="'city'"):
        check_required_metadata(SingleString, [{}], "training prompts")
