"""rollout.source=api on the trainer side: config checks, groups -> Rollouts/Samples (masks,
missing logprobs), acks and policy versions, and clear errors for groups the trainer cannot use."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.config.loader import load_config  # noqa: E402
from posttrain.config.ppo_schema import PPOConfig  # noqa: E402
from posttrain.config.schema import GRPOConfig  # noqa: E402
from posttrain.envs.client import RolloutAPIClient  # noqa: E402
from posttrain.errors import ConfigError, PosttrainError  # noqa: E402
from posttrain.models.loading import autocast_context  # noqa: E402
from posttrain.server.group_queue import GroupQueue  # noqa: E402
from posttrain.server.rollout_api import create_rollout_api_app  # noqa: E402
from posttrain.trainer.api_source import make_api_source  # noqa: E402
from posttrain.trainer.rollouts import _sample_logprobs  # noqa: E402
from posttrain.trainer.samples import Sample  # noqa: E402
from server.live import live_server  # noqa: E402

AUTOCAST = autocast_context(torch.device("cpu"), torch.float32)


def test_config_checks():
    with pytest.raises(ConfigError, match="rollout.api_url"):
        load_config(GRPOConfig, None, ["rollout.source=api"])
    with pytest.raises(ConfigError, match="max_turns"):
        load_config(GRPOConfig, None, ["rollout.source=api", "rollout.api_url=http://x:1", "rollout.max_turns=2",
                                       "model.use_chat_template=true"])
    with pytest.raises(ConfigError, match="grpo command only"):
        load_config(PPOConfig, None, ["rollout.source=api", "rollout.api_url=http://x:1"])
    cfg = load_config(GRPOConfig, None, ["rollout.source=api", "rollout.api_url=http://127.0.0.1:8100"])
    assert cfg.rollout.source == "api"


@pytest.fixture
def setup():
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    queue = GroupQueue(max_groups=8, max_staleness=1)
    with live_server(create_rollout_api_app(queue)) as url:
        cfg = load_config(GRPOConfig, None, ["rollout.source=api", f"rollout.api_url={url}", "rollout.group_size=2",
                                             "rollout.batch_size=4", "rollout.api_timeout_s=1", "trainer.mini_batch_size=4",
                                             "trainer.micro_batch_size=2"])
        env = RolloutAPIClient(url)
        env.register("env-a", 2)
        yield cfg, model, tok, queue, env


def _source(cfg, model, tok, version=0):
    return make_api_source(model, tok, "cpu", AUTOCAST, rollout=cfg.rollout, algo=cfg.algorithm, trainer=cfg.trainer,
                           model_cfg=cfg.model, start_version=version)


def test_groups_become_rollouts(setup):
    cfg, model, tok, queue, env = setup
    source = _source(cfg, model, tok)
    env.submit_group([5, 6, 7], [[8, 9], [10]], [1.0, 0.0], policy_version=0, logprobs=[[-0.5, -0.25], [-1.0]],
                     finish_reasons=["stop", "length"], metadata={"level": 2})
    env.submit_group([5], [[11, 12, 13], [14]], [0.5, 0.5], policy_version=0, masks=[[1, 0, 1], [1]])  # no logprobs
    rollouts = source.pull(2)
    assert rollouts.rewards.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert [c.token_ids for c in rollouts.completions] == [[8, 9], [10], [11, 12, 13], [14]]
    assert [c.finish_reason for c in rollouts.completions] == ["stop", "length", "stop", "stop"]
    assert rollouts.completions[0].logprobs == [-0.5, -0.25]
    assert rollouts.completions[2].trainable_mask == [1, 0, 1] and rollouts.completions[3].trainable_mask is None
    assert rollouts.prompts[0].metadata == {"level": 2, "task": "env-a"}
    assert rollouts.prompts[0].token_ids == [5, 6, 7] and rollouts.completions[0].text == tok.decode([8, 9])
    # Missing logprobs are the current policy's.
    expected = _sample_logprobs(model, [Sample([5], [11, 12, 13], [], 0.0, 0.0)], cfg.trainer, cfg.rollout, cfg.model,
                                tok.pad_token_id, "cpu", AUTOCAST)[0]
    assert rollouts.completions[2].logprobs == pytest.approx(expected)

    metrics = source.step_metrics()
    assert metrics["api/groups/env-a"] == 2 and metrics["api/staleness_mean"] == 0
    assert queue.status()["leased"] == 2
    source.finish_step(1)
    status = queue.status()
    assert (status["leased"], status["consumed"], status["policy_version"]) == (0, 2, 1)


def test_a_restarted_trainer_gets_unacknowledged_groups_again(setup):
    cfg, model, tok, queue, env = setup
    for score in (1.0, 2.0):
        env.submit_group([5], [[8], [9]], [score, 0.0], policy_version=0)
    _source(cfg, model, tok).pull(2)  # this trainer dies before finish_step
    again = _source(cfg, model, tok, version=0).pull(2)
    assert again.rewards.tolist() == [1.0, 0.0, 2.0, 0.0]


def test_unusable_groups_and_timeouts_are_clear_errors(setup):
    cfg, model, tok, queue, env = setup
    source = _source(cfg, model, tok)
    with pytest.raises(PosttrainError, match="waited 1 s for 1 groups.*env-a"):
        source.pull(1)
    env.submit_group([5], [[8], [10_000]], [1.0, 0.0], policy_version=0)
    with pytest.raises(PosttrainError, match="outside the policy's vocabulary"):
        source.pull(1)
    env3 = RolloutAPIClient(cfg.rollout.api_url)
    env3.register("env-3", 3)
    env3.submit_group([5], [[8], [9], [10]], [1.0, 0.0, 0.0], policy_version=0)
    with pytest.raises(PosttrainError, match="group of 3 completions, but rollout.group_size=2"):
        source.pull(1)
