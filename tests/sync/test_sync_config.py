import pytest

from posttrain.config.loader import load_config
from posttrain.config.schema import GRPOConfig
from posttrain.errors import ConfigError
from posttrain.sync import resolve_sync_mode

REMOTE = ["rollout.backend=openai", "rollout.base_url=http://127.0.0.1:8001"]


@pytest.mark.parametrize("overrides, expected", [
    ([], "shared"),
    (["rollout.backend=hf"], "shared"),
    (REMOTE, "checkpoint"),
    (REMOTE + ["model.lora.r=8"], "lora"),
    (REMOTE + ["sync.mode=broadcast"], "broadcast"),
])
def test_auto_mode(overrides, expected):
    cfg = load_config(GRPOConfig, None, overrides)
    assert resolve_sync_mode(cfg.sync, cfg.rollout.backend, cfg.model.lora.r > 0) == expected


@pytest.mark.parametrize("overrides, message", [
    (["rollout.backend=openai"], "needs rollout.base_url"),
    (["sync.mode=checkpoint"], "generates with the trainer's own modules"),
    (["rollout.backend=hf", "sync.mode=broadcast"], "rollout.backend=hf generates with the trainer's own modules"),
    (REMOTE + ["model.lora.r=8", "sync.mode=shared"], "use sync.mode=lora"),
    (REMOTE + ["model.lora.r=8", "sync.mode=broadcast"], "use sync.mode=lora"),
    (REMOTE + ["sync.mode=lora"], "needs model.lora.r > 0"),
    (REMOTE + ["sync.interval=0"], "sync.interval=0 must be >= 1"),
    (REMOTE + ["sync.collective_timeout_s=0"], "sync.collective_timeout_s=0"),
    (REMOTE + ["sync.mode=brodcast"], "Did you mean 'broadcast'"),
    (REMOTE + ["trainer.num_processes=2"], "rollout.backend=openai is not supported on several processes"),
])
def test_impossible_combinations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, None, overrides)
