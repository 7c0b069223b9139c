"""Values derived from a config once, for every recipe, --dry-run and the engine's sizing."""

from posttrain.config import derived
from posttrain.config.loader import load_config
from posttrain.config.ppo_schema import PPOConfig
from posttrain.config.schema import GRPOConfig


def test_validation_max_new_tokens_falls_back_to_the_rollouts_limit():
    cfg = load_config(GRPOConfig, overrides=["rollout.max_new_tokens=96"])
    assert derived.validation_max_new_tokens(cfg) == 96
    cfg = load_config(GRPOConfig, overrides=["rollout.max_new_tokens=96", "validation.max_new_tokens=200"])
    assert derived.validation_max_new_tokens(cfg) == 200


def test_optimizer_steps_per_step_counts_epochs_and_mini_batches():
    cfg = load_config(GRPOConfig, overrides=["rollout.batch_size=32", "rollout.group_size=4",
                                             "trainer.mini_batch_size=8", "algorithm.ppo_epochs=2"])
    assert derived.optimizer_steps_per_step(cfg.algorithm, cfg.rollout, cfg.trainer) == 8
    ppo = load_config(PPOConfig, overrides=["rollout.batch_size=16", "trainer.mini_batch_size=16"])
    assert derived.optimizer_steps_per_step(ppo.algorithm, ppo.rollout, ppo.trainer) == ppo.algorithm.ppo_epochs


def test_rollout_sampling_follows_the_rollout_section():
    cfg = load_config(GRPOConfig, overrides=["rollout.group_size=4", "rollout.temperature=0.7", "rollout.top_p=0.9",
                                             "rollout.top_k=20", "rollout.max_new_tokens=33", "rollout.stop=['###']"])
    s = derived.rollout_sampling(cfg)
    assert (s.n, s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop) == (4, 0.7, 0.9, 20, 33, ["###"])
