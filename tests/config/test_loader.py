"""Config loading: merge order, presets, every user error's message, cross-field validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from posttrain.config import (
    GRPOConfig,
    config_to_dict,
    config_to_yaml,
    list_presets,
    load_config,
    resolve_config_file,
    validate_config,
)
from posttrain.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(GRPOConfig, *args, **kwargs)
    return str(info.value)


def test_defaults_load_as_a_real_dataclass():
    cfg = load_config(GRPOConfig)
    assert type(cfg) is GRPOConfig
    assert cfg == GRPOConfig()


@pytest.mark.parametrize("name", ["cpu_quick", "cpu_quick.yaml"])
def test_preset_loads_by_name(name):
    cfg = load_config(GRPOConfig, name)
    assert (cfg.rollout.batch_size, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (16, 4, 64)
    assert (cfg.trainer.mini_batch_size, cfg.trainer.micro_batch_size) == (16, 4)
    assert cfg.validation.max_prompts == 16 and cfg.env.num_workers == 1


def test_gsm8k_preset_needs_train_path(tmp_path):
    assert {"gsm8k", "cpu_quick"} <= set(list_presets())
    message = error_of("gsm8k")
    assert "data.train_path is required for data.task=gsm8k" in message
    train = write(tmp_path, '{"question": "1+1?", "answer": "#### 2"}\n', "train.jsonl")
    cfg = load_config(GRPOConfig, "gsm8k", [f"data.train_path={train}"])
    assert cfg.data.task == "gsm8k" and cfg.rollout.max_new_tokens == 300


def test_unknown_preset_lists_presets():
    message = error_of("no_such_preset")
    assert "'no_such_preset'" in message and "cpu_quick" in message and "gsm8k" in message


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 3.0e-06\n  max_steps: 7\nseed: 1\n")
    cfg = load_config(GRPOConfig, str(path), ["trainer.lr=1e-6", "seed=2", "seed=3"])
    assert cfg.trainer.lr == 1e-6  # override beats the file
    assert cfg.trainer.max_steps == 7  # file beats the default
    assert cfg.seed == 3  # later overrides win
    assert cfg.trainer.micro_batch_size == 16  # untouched default
    assert resolve_config_file(str(path)) == path


def test_list_dict_and_string_overrides(tmp_path):
    path = write(tmp_path, "env:\n  kwargs:\n    answer_extraction: lenient\n")
    cfg = load_config(GRPOConfig, path, [
        "rollout.stop=[a,b]", "env.kwargs.format_reward=0.2", "model.system_prompt=Be brief: answer.",
        "model.path=1e-6", "data.instruction=",
    ])
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.env.kwargs == {"answer_extraction": "lenient", "format_reward": 0.2}
    assert cfg.model.system_prompt == "Be brief: answer."  # str options take the text verbatim
    assert cfg.model.path == "1e-6"
    assert cfg.data.instruction == ""


def test_unknown_key_suggests_the_nearest():
    message = error_of(overrides=["trainer.lrr=1e-6"])
    assert "Unknown config key 'trainer.lrr'. Did you mean 'trainer.lr'?" in message
    assert "micro_batch_size" in message  # the section's valid keys
    assert "Did you mean 'trainer.lr'?" in error_of(overrides=["lr=1e-6"])
    assert "Did you mean 'trainer'?" in error_of(overrides=["traner.lr=1e-6"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "rollout:\n  group_sise: 4\n")
    message = error_of(path)
    assert "'rollout.group_sise'" in message and "'rollout.group_size'" in message and str(path) in message


def test_wrong_type_names_key_type_and_value():
    message = error_of(overrides=["trainer.max_steps=many"])
    assert "'trainer.max_steps'" in message and "expected int" in message and "'many'" in message
    assert "expected list" in error_of(overrides=["rollout.stop=foo"])
    assert "is a section" in error_of(overrides=["trainer=5"])
    assert "not a section" in error_of(overrides=["trainer.lr.x=5"])


def test_choices_enforced():
    message = error_of(overrides=["model.dtype=bf16"])
    assert "model.dtype='bf16'" in message and "bfloat16, float16" in message
    assert "Did you mean 'bfloat16'?" in message


def test_override_without_equals_and_bad_value():
    message = error_of(overrides=["trainer.lr"])
    assert "'trainer.lr'" in message and "KEY=VALUE" in message
    assert "Cannot parse the value" in error_of(overrides=["rollout.stop=[a,b"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 1e-6\n  stop: [a, b\n")
    message = error_of(path)
    assert str(path) in message and "line 4" in message


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "a list"), ("5\n", "a single value")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    message = error_of(write(tmp_path, text))
    assert kind in message and "mapping" in message


def test_empty_file_and_empty_section_are_fine(tmp_path):
    assert load_config(GRPOConfig, write(tmp_path, "# nothing\n")) == GRPOConfig()
    assert load_config(GRPOConfig, write(tmp_path, "trainer:\n  # lr: 1\n", "b.yaml")) == GRPOConfig()


def test_interpolation_errors_are_translated():
    cfg = load_config(GRPOConfig, overrides=["checkpoint.every=7", "validation.every=${checkpoint.every}"])
    assert cfg.validation.every == 7
    message = error_of(overrides=["trainer.lr=${nope.x}"])
    assert "'trainer.lr'" in message and "nope.x" in message


def test_cross_field_problems_are_collected_together():
    message = error_of(overrides=[
        "rollout.batch_size=100", "trainer.micro_batch_size=48", "trainer.micro_batch_tokens=0", "rollout.temperature=0",
        "rollout.top_p=1.5", "trainer.lr=0", "data.arithmetic.difficulty=6", "env.timeout_s=0",
        "checkpoint.keep_last=-1",
    ])
    for fragment in ["rollout.batch_size=100 must be a multiple of rollout.group_size=8",
                     "trainer.mini_batch_size=128 must divide rollout.batch_size=100",
                     "trainer.micro_batch_size=48 must divide trainer.mini_batch_size=128",
                     "rollout.temperature=0.0 must be > 0", "rollout.top_p=1.5", "trainer.lr=0.0",
                     "data.arithmetic.difficulty=6", "env.timeout_s=0.0", "checkpoint.keep_last=-1"]:
        assert fragment in message
    assert "(9 problems)" in message


def test_group_of_one_is_rejected_for_grpo():
    assert "rollout.group_size=1 must be >= 2" in error_of(overrides=["rollout.group_size=1"])


def test_algorithm_family_checks():
    message = error_of(overrides=[
        "algorithm.dual_clip_c=0.5", "algorithm.overlong_buffer=128", "algorithm.max_sampling_rounds=0",
        "algorithm.overlong_penalty=-1", "algorithm.gspo_clip_low=1.5",
    ])
    for fragment in ["algorithm.dual_clip_c=0.5 must be 0 (off) or > 1", "algorithm.overlong_buffer=128 must be >= 0 "
                     "and < rollout.max_new_tokens=128", "algorithm.max_sampling_rounds=0 must be >= 1",
                     "algorithm.overlong_penalty=-1.0", "algorithm.gspo_clip_low=1.5"]:
        assert fragment in message
    assert "only applies to algorithm.policy_loss=ppo_clip" in error_of(
        overrides=["algorithm.policy_loss=gspo", "algorithm.dual_clip_c=3"])
    assert "algorithm.advantage=rloo" in error_of(overrides=["algorithm.advantage=rloo", "rollout.group_size=1",
                                                              "rollout.batch_size=8", "trainer.mini_batch_size=8"])
    assert "dynamic_sampling=true needs rollout.group_size >= 2" in error_of(overrides=[
        "algorithm.advantage=reinforce_plus_plus", "algorithm.dynamic_sampling=true", "rollout.group_size=1"])
    cfg = load_config(GRPOConfig, overrides=["algorithm.advantage=reinforce_plus_plus", "rollout.group_size=1",
                                             "algorithm.policy_loss=gspo", "algorithm.overlong_buffer=32"])
    assert cfg.algorithm.advantage == "reinforce_plus_plus"


def test_data_paths_checked(tmp_path):
    message = error_of(overrides=["data.task=prompts", f"data.train_path={tmp_path / 'missing.jsonl'}"])
    assert "data.train_path=" in message and "does not exist" in message
    cfg = load_config(GRPOConfig, overrides=["data.task=prompts", "data.train_path=hf:org/name"])
    assert cfg.data.train_path == "hf:org/name"


def test_validate_config_on_an_object():
    cfg = GRPOConfig()
    validate_config(cfg)
    bad = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, group_size=3))
    with pytest.raises(ConfigError, match="rollout.batch_size=128 must be a multiple of rollout.group_size=3"):
        validate_config(bad)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(GRPOConfig, "cpu_quick", [
        'rollout.stop=["\\n\\n", "</answer>"]', "env.kwargs.format_reward=0.2", "model.path=123",
        "model.system_prompt=Say: 'hi' # now", "trainer.lr=3e-7", "logging.wandb=true",
    ])
    path = write(tmp_path, config_to_yaml(cfg), "printed.yaml")
    assert load_config(GRPOConfig, path) == cfg
    assert config_to_dict(cfg)["rollout"]["stop"] == ["\n\n", "</answer>"]


def test_engine_sizes_that_cannot_work_are_config_errors():
    message = error_of(overrides=["rollout.engine.block_size=12", "rollout.engine.max_num_seqs=0",
                                  "rollout.engine.kv_cache_memory_fraction=1.5", "rollout.engine.cpu_kv_cache_gb=0"])
    for key in ("block_size=12", "max_num_seqs=0", "kv_cache_memory_fraction=1.5", "cpu_kv_cache_gb=0"):
        assert f"rollout.engine.{key}" in message


def test_partial_recompute_kv_only_where_weights_change_mid_generation():
    from posttrain.config.schema import GRPOConfig
    from posttrain.errors import ConfigError

    base = ["rollout.partial_recompute_kv=true", "env.num_workers=1"]
    for extra, named in [([], "mode=sync"), (["rollout.mode=async", "rollout.partial_rollouts=false"],
                                             "partial_rollouts=false"),
                         (["rollout.mode=async", "rollout.backend=hf"], "backend=hf")]:
        with pytest.raises(ConfigError, match=f"rollout.partial_recompute_kv=true applies.*{named}"):
            load_config(GRPOConfig, overrides=base + extra)
    assert load_config(GRPOConfig, overrides=base + ["rollout.mode=async"]).rollout.partial_recompute_kv


def test_a_synchronous_run_on_ray_gets_the_replica_checks_named_for_ray():
    from posttrain.config import derived
    from posttrain.config.ppo_schema import PPOConfig
    from posttrain.config.schema import GRPOConfig

    ray_sync = ["cluster.backend=ray", "env.num_workers=1"]
    cfg = load_config(GRPOConfig, overrides=ray_sync)
    assert derived.uses_engine_replicas(cfg) and derived.replica_max_staleness(cfg) == 0
    local = load_config(GRPOConfig, overrides=["rollout.max_staleness=2"])
    assert not derived.uses_engine_replicas(local) and derived.replica_max_staleness(local) == 0
    asyn = load_config(GRPOConfig, overrides=["rollout.mode=async", "rollout.max_staleness=2", "env.num_workers=1"])
    assert derived.uses_engine_replicas(asyn) and derived.replica_max_staleness(asyn) == 2
    with pytest.raises(ConfigError, match="cluster.backend=ray is supported by the grpo command only"):
        load_config(PPOConfig, overrides=ray_sync)
    with pytest.raises(ConfigError, match="cluster.backend=ray with rollout.max_turns=2"):
        load_config(GRPOConfig, overrides=ray_sync + ["rollout.max_turns=2"])


def test_ppo_refuses_expert_parallelism_it_would_ignore():
    # PPO's policy gets the MoE preparation but no memory knobs: moe.ep_mode would split nothing.
    from posttrain.config.ppo_schema import PPOConfig

    with pytest.raises(ConfigError, match=r"moe.ep_mode=ipc: `posttrain ppo` does not split experts.*moe.ep_mode=single"):
        load_config(PPOConfig, overrides=["moe.ep_mode=ipc"])
    assert load_config(PPOConfig, overrides=["moe.random_init.family=mixtral"]).moe.random_init.family == "mixtral"
    assert load_config(PPOConfig, overrides=["moe.ep_mode=auto"]).moe.ep_mode == "auto"
