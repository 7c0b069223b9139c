"""Many tasks in one run: env.tasks specs, routing rows to their task's environment, per-task metrics."""

from __future__ import annotations

import pytest
import torch

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.data.example import PromptExample
from posttrain.envs.registry import SINGLE_TASK, check_task_data, env_specs, resolve_env_classes
from posttrain.envs.reward_pool import RewardPool
from posttrain.errors import ConfigError

TASKS = {"a": {"cls": "toy_envs.TaskAEnv"}, "b": {"cls": "toy_envs.TaskBEnv", "kwargs": {"reward": 0.25}}}


def logs_and_metadata(tasks: list[str]) -> tuple[list, list[dict]]:
    logs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": str(i)}] for i in range(len(tasks))]
    return logs, [{"task": t, "keyword": "k", "i": i} for i, t in enumerate(tasks)]


def test_env_specs_single_and_tasks():
    assert env_specs("math", {"format_reward": 0.2}) == {SINGLE_TASK: ("math", {"format_reward": 0.2})}
    specs = env_specs("math", {}, TASKS)
    assert specs == {"a": ("toy_envs.TaskAEnv", {}), "b": ("toy_envs.TaskBEnv", {"reward": 0.25})}
    assert [c.__name__ for c in resolve_env_classes(specs).values()] == ["TaskAEnv", "TaskBEnv"]


@pytest.mark.parametrize("tasks, match", [
    ({"a": {"kwargs": {}}}, "env.tasks.a must be a mapping with a 'cls'"),
    ({"a": "math"}, "env.tasks.a must be a mapping"),
    ({"a": {"cls": "maths"}}, r"env.tasks.a.cls='maths'.*Did you mean 'math'"),
    ({"a": {"cls": "math", "kwargs": {"format_rewrd": 1}}}, r"env.tasks.a.kwargs has arguments.*format_reward"),
    ({"a": {"cls": "math", "kwarg": {}}}, r"env.tasks.a has unknown keys \['kwarg'\]"),
])
def test_bad_task_specs(tasks, match):
    with pytest.raises(ConfigError, match=match):
        env_specs("math", {}, tasks)


def test_loader_validates_env_tasks_and_mix(tmp_path):
    # The environments' classes and kwargs are checked where they are resolved (the first thing
    # grpo/ppo do, and --dry-run): the config layer imports nothing from envs.
    cfg = load_config(GRPOConfig, overrides=["env.tasks={a: {cls: toy_envs.TaskAEnv}, b: {cls: math, kwargs: {x: 1}}}"])
    with pytest.raises(ConfigError, match="env.tasks.b.kwargs"):
        env_specs(cfg.env.cls, cfg.env.kwargs, cfg.env.tasks)
    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "p"}\n')
    cfg = load_config(GRPOConfig, overrides=[
        "env.tasks={a: {cls: toy_envs.TaskAEnv}}", "data.task=prompts", f"data.mix=[{{path: {data}, task: a, weight: 2}}]",
    ])  # no data.train_path needed with data.mix
    assert cfg.env.tasks == {"a": {"cls": "toy_envs.TaskAEnv"}} and cfg.data.mix[0]["weight"] == 2
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, overrides=[
            "env.tasks={a: {cls: toy_envs.TaskAEnv}}", "data.task=prompts",
            f"data.mix=[{{path: {data}, task: aa, weight: -1, prompt_col: x}}, {{path: nope.jsonl, task: a}}]",
        ])
    message = str(e.value)
    for part in ("data.mix[0].task='aa' is not one of env.tasks (a). Did you mean 'a'?", "data.mix[0].weight=-1",
                 "Did you mean 'prompt_column'?", "data.mix[1].path='nope.jsonl' does not exist"):
        assert part in message, part
    with pytest.raises(ConfigError, match="data.mix is only used with data.task=prompts"):
        load_config(GRPOConfig, overrides=[f"data.mix=[{{path: {data}, task: a}}]"])


def test_unknown_or_missing_task_is_a_config_error():
    classes = resolve_env_classes(env_specs("math", {}, TASKS))
    rows = [PromptExample([], {"task": "a"}), PromptExample([], {"task": "b", "keyword": "k"})]
    check_task_data(classes, rows, "training prompts")
    bad = rows + [PromptExample([], {"task": "c"})] * 3 + [PromptExample([], {})] * 2
    with pytest.raises(ConfigError) as e:
        check_task_data(classes, bad, "training prompts")
    message = str(e.value)
    assert "3 rows have task 'c'" in message and "2 rows have no 'task' column" in message
    assert "of 7 training prompts" in message and "'a', 'b'" in message


def test_required_metadata_is_checked_per_task():
    classes = resolve_env_classes(env_specs("math", {}, TASKS))
    rows = [PromptExample([], {"task": "a"}), PromptExample([], {"task": "b"})]  # only b needs 'keyword'
    with pytest.raises(ConfigError, match=r"TaskBEnv needs metadata 'keyword'.*1 of 1 validation prompts of task 'b'"):
        check_task_data(classes, rows, "validation prompts")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_pool_routes_rows_to_their_task_and_reports_per_task_metrics(num_workers):
    tasks = ["a", "b", "b", "a", "b"]
    with RewardPool("math", {}, num_workers=num_workers, timeout_s=5.0, tasks=TASKS) as pool:
        assert pool.task_names == ["a", "b"]
        scored = pool.score(*logs_and_metadata(tasks))
        assert scored.rewards.tolist() == [1.0, 0.25, 0.25, 1.0, 0.25]
        assert [m["scored_by"] for m in scored.metadata] == ["A", "B", "B", "A", "B"]
        assert [m["i"] for m in scored.metadata] == list(range(5)) and scored.errors == [None] * 5
        out, metrics = pool.post_process({"rewards": scored.rewards, "metadata": scored.metadata,
                                          "answers": scored.answers, "step": 3})
        assert metrics == {"a/accuracy": 1.0, "a/rows": 2.0, "b/accuracy": 0.0, "b/rows": 3.0}
        assert out["rewards"].tolist() == scored.rewards.tolist() and out["step"] == 3
        # A row whose task has no environment gets reward 0 with the reason, like any failing sample.
        odd = pool.score(*logs_and_metadata(["a", "zzz"]))
        assert odd.rewards.tolist() == [1.0, 0.0] and "no environment for task 'zzz'" in odd.errors[1]


def test_single_environment_pool_keeps_unprefixed_metrics():
    with RewardPool("toy_envs.TaskAEnv", {}, num_workers=0, timeout_s=5.0) as pool:
        assert pool.task_names == []
        scored = pool.score(*logs_and_metadata(["x", "y"]))  # a task column means nothing without env.tasks
        _, metrics = pool.post_process({"rewards": scored.rewards, "metadata": scored.metadata})
    assert scored.rewards.tolist() == [1.0, 1.0] and metrics == {"accuracy": 1.0, "rows": 2.0}


def test_rollout_and_validation_metrics_per_task():
    from types import SimpleNamespace

    from posttrain.trainer.rollouts import Rollouts, rollout_metrics

    prompts = [SimpleNamespace(metadata={"task": t}) for t in ("a", "a", "b", "b")]
    completions = [SimpleNamespace(token_ids=[1, 2], finish_reason="stop")] * 4
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    rollouts = Rollouts(prompts, completions, [None] * 4, rewards, rewards, [{}] * 4, [None] * 4, [None] * 4)
    metrics = rollout_metrics(rollouts, {"a/accuracy": 0.5, "b/accuracy": 1.0}, group_size=2)
    assert metrics["reward/a/mean"] == 0.5 and metrics["reward/b/mean"] == 0.5 and metrics["reward/mean"] == 0.5
    assert metrics["reward/a/accuracy"] == 0.5 and metrics["reward/b/accuracy"] == 1.0
    single = rollout_metrics(Rollouts([SimpleNamespace(metadata={})] * 4, completions, [None] * 4, rewards, rewards,
                                      [{}] * 4, [None] * 4, [None] * 4), {"accuracy": 0.5}, group_size=2)
    assert not [k for k in single if k.count("/") > 1] and single["reward/accuracy"] == 0.5
