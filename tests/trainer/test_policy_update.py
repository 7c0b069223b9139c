"""Gradient accumulation: any micro-batch split gives the same update as the whole mini-batch."""

import contextlib
import copy

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.config.schema import GRPOConfig
from posttrain.trainer.policy import policy_update
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.samples import Sample


def _samples():
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        prompt = torch.randint(4, 90, (3 + i % 4,), generator=g).tolist()
        response = torch.randint(4, 90, (2 + (i * 3) % 7,), generator=g).tolist()
        old = (-torch.rand(len(response), generator=g) * 3).tolist()
        ref = (-torch.rand(len(response), generator=g) * 3).tolist()
        samples.append(Sample(prompt, response, old, advantage=float(i % 3 - 1), reward=0.0, ref_logprobs=ref))
    return samples


def _update(model, micro_batch_size, mode):
    cfg = GRPOConfig()
    cfg.rollout.batch_size = cfg.trainer.mini_batch_size = 8
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = micro_batch_size
    cfg.trainer.micro_batch_tokens = 0  # sample-count micro-batches (packed ones: test_packing_rl.py)
    cfg.trainer.lr = 1e-2
    # A large eps keeps Adam's first step linear in the gradient; with a tiny eps it is sign(g),
    # which turns float rounding of near-zero gradient entries into +-lr differences.
    cfg.trainer.adam_eps = 1.0
    cfg.algorithm.loss_agg_mode = mode
    cfg.algorithm.kl_coef = 0.1
    cfg.algorithm.entropy_coef = 0.01
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    metrics = policy_update(model, optimizer, scheduler, _samples(), 0, torch.device("cpu"), contextlib.nullcontext,
                            algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                            moe_cfg=cfg.moe)
    return model, metrics


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_does_not_change_the_update(mode):
    base = make_tiny_llama(make_tokenizer())
    whole, m_whole = _update(copy.deepcopy(base), 8, mode)
    split, m_split = _update(copy.deepcopy(base), 2, mode)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert m_whole["loss/policy"] == pytest.approx(m_split["loss/policy"], rel=1e-5, abs=1e-7)
    assert m_whole["grad_norm"] == pytest.approx(m_split["grad_norm"], rel=1e-5)
    assert m_whole["kl"] == pytest.approx(m_split["kl"], rel=1e-5)
    assert not torch.equal(next(base.parameters()), next(whole.parameters()))


def _update_kept(model, micro_batch_size, mode, samples):
    """Dynamic sampling kept 6 of rollout.batch_size=8 completions; mini-batches of 4 -> [4, 2]."""
    cfg = GRPOConfig()
    cfg.rollout.batch_size, cfg.trainer.mini_batch_size = 8, 4
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = micro_batch_size
    cfg.trainer.micro_batch_tokens = 0  # sample-count micro-batches (packed ones: test_packing_rl.py)
    cfg.trainer.lr = 1e-2
    cfg.trainer.adam_eps = 1.0
    cfg.trainer.lr_scheduler = "linear"
    cfg.algorithm.loss_agg_mode = mode
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 4)
    metrics = policy_update(model, optimizer, scheduler, samples, 0, torch.device("cpu"), contextlib.nullcontext,
                            algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                            moe_cfg=cfg.moe)
    return model, metrics, scheduler


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_fewer_kept_samples_and_masked_samples_keep_split_invariance(mode):
    samples = _samples()[:6]
    samples[1].trainable = False  # e.g. a truncated completion with algorithm.mask_truncated
    base = make_tiny_llama(make_tokenizer())
    whole, m_whole, sched = _update_kept(copy.deepcopy(base), 4, mode, copy.deepcopy(samples))
    split, m_split, _ = _update_kept(copy.deepcopy(base), 1, mode, copy.deepcopy(samples))
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert m_whole["loss/policy"] == pytest.approx(m_split["loss/policy"], rel=1e-5, abs=1e-7)
    # Two optimizer steps were taken, but the schedule advanced by the configured 8 / 4 = 2 steps as well.
    assert sched.last_epoch == 2


def test_masked_sample_gets_no_gradient():
    base = make_tiny_llama(make_tokenizer())
    samples = _samples()[:1]
    samples[0].trainable = False
    model, metrics, sched = _update_kept(copy.deepcopy(base), 4, "token-mean", samples)
    assert metrics["loss/policy"] == 0.0 and metrics["grad_norm"] == 0.0
    for (name, a), b in zip(model.named_parameters(), base.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert sched.last_epoch == 2  # one mini-batch taken, the schedule still follows the step


def test_per_token_advantages_are_used():
    # A per-token list equal to the scalar broadcast gives the same update.
    base = make_tiny_llama(make_tokenizer())
    scalar = _samples()
    per_token = _samples()
    for s in per_token:
        s.advantage = [s.advantage] * len(s.response_ids)
    m1, _, _ = _update_kept(copy.deepcopy(base), 4, "token-mean", scalar)
    m2, _, _ = _update_kept(copy.deepcopy(base), 4, "token-mean", per_token)
    for (name, x), y in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, msg=name)


def test_truncated_is_correction_weights_the_policy_loss():
    """With rollout logprobs log(2) below the trainer's, every weight is min(2, cap)."""
    import math

    def run(rollout_shift, cap):
        model = make_tiny_llama(make_tokenizer())
        cfg = GRPOConfig()
        cfg.rollout.batch_size = cfg.trainer.mini_batch_size = cfg.trainer.micro_batch_size = 8
        cfg.algorithm.is_correction_cap = cap
        samples = _samples()
        for s in samples:
            s.ref_logprobs = None
            if rollout_shift is not None:
                s.rollout_logprobs = [lp - rollout_shift for lp in s.old_logprobs]
        optimizer = build_optimizer(model, cfg.trainer)
        return policy_update(model, optimizer, build_scheduler(optimizer, cfg.trainer, 1), samples,
                             0, torch.device("cpu"), contextlib.nullcontext,
                             algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                             moe_cfg=cfg.moe)

    plain = run(None, 0.0)
    weighted = run(math.log(2.0), 1.5)
    assert weighted["actor/is_weight"] == pytest.approx(1.5)
    assert weighted["loss/policy"] == pytest.approx(1.5 * plain["loss/policy"], rel=1e-5)
    assert weighted["actor/rollout_logprob_diff"] == pytest.approx(math.log(2.0), rel=1e-5)


def test_next_micro_batch_is_collated_before_the_gradient_norm_sync(monkeypatch):
    """The host builds the next mini-batch's first micro-batch while the GPU finishes this one's
    backward, not after the gradient-norm read that waits for it."""
    import posttrain.trainer.policy as policy

    events = []
    real_collate, real_clip = policy.collate, policy.clip_and_step
    monkeypatch.setattr(policy, "collate", lambda samples, *a, **kw: events.append(f"collate {len(samples)}") or
                        real_collate(samples, *a, **kw))
    monkeypatch.setattr(policy, "clip_and_step", lambda *a: events.append("clip") or real_clip(*a))
    cfg = GRPOConfig()
    cfg.rollout.batch_size, cfg.trainer.mini_batch_size, cfg.trainer.micro_batch_size = 8, 4, 2
    cfg.trainer.micro_batch_tokens = 0
    cfg.algorithm.ppo_epochs = 2
    model = make_tiny_llama(make_tokenizer())
    optimizer = build_optimizer(model, cfg.trainer)
    policy_update(model, optimizer, build_scheduler(optimizer, cfg.trainer, 4), _samples(),
                  0, torch.device("cpu"), contextlib.nullcontext,
                  algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model, moe_cfg=cfg.moe)
    # 2 epochs x 2 mini-batches x 2 micro-batches, each collated one ahead of its use: before each
    # gradient-norm sync but the last, the next mini-batch's first micro-batch is ready.
    c = "collate 2"
    assert events == [c, c, c, "clip", c, c, "clip", c, c, "clip", c, "clip"]


@pytest.mark.parametrize("correction,packed", [("none", False), ("tis_token", False), ("none", True)])
def test_old_logprobs_from_the_update_equal_a_separate_pass_before_it(correction, packed):
    """One optimizer step per step: the update's own forward pass (detached) gives the trainer's
    old logprobs that recompute_old_logprobs computes in a pass of its own, so skipping that pass
    changes neither the update nor the metrics."""
    from posttrain.trainer.rollouts import recompute_old_logprobs

    base = make_tiny_llama(make_tokenizer())
    cfg = GRPOConfig()
    cfg.rollout.batch_size = cfg.trainer.mini_batch_size = 8
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = 3
    cfg.trainer.micro_batch_tokens = 24 if packed else 0
    cfg.trainer.lr, cfg.trainer.adam_eps = 1e-2, 1.0
    cfg.algorithm.kl_coef, cfg.algorithm.off_policy_correction = 0.1, correction
    cfg.model.chunked_logprobs = 0
    kw = dict(algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model, moe_cfg=cfg.moe)
    results = []
    for from_update in (False, True):
        model, samples = copy.deepcopy(base), _samples()
        for s in samples:  # an engine whose logprobs differ from the trainer's
            s.old_logprobs = [x * 0.01 - 1.0 for x in s.old_logprobs]
        engine_logprobs = [list(s.old_logprobs) for s in samples]
        optimizer = build_optimizer(model, cfg.trainer)
        scheduler = build_scheduler(optimizer, cfg.trainer, 1)
        mismatch = {}
        if not from_update:
            mismatch = recompute_old_logprobs(model, samples, 0, torch.device("cpu"), contextlib.nullcontext,
                                              trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                                              router_replay=False)
        metrics = policy_update(model, optimizer, scheduler, samples, 0, torch.device("cpu"), contextlib.nullcontext,
                                old_from_update=from_update, **kw)
        assert [s.rollout_logprobs for s in samples] == engine_logprobs
        results.append((model, {**metrics, **mismatch}, samples))
    (recomputed, m_recomputed, s_recomputed), (from_update, m_from_update, s_from_update) = results
    for (name, a), b in zip(recomputed.named_parameters(), from_update.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(s_recomputed, s_from_update):
        assert a.old_logprobs == pytest.approx(b.old_logprobs, rel=1e-5, abs=1e-6)
    assert set(m_recomputed) == set(m_from_update)
    for key in ("loss/policy", "grad_norm", "kl", "rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max",
                "off_policy/mismatch_kl"):
        assert m_from_update[key] == pytest.approx(m_recomputed[key], rel=1e-5, abs=1e-7), key
    assert m_from_update["rollout/logprob_mismatch_mean"] > 0.1


def test_old_logprobs_from_the_update_need_one_optimizer_step():
    model = make_tiny_llama(make_tokenizer())
    cfg = GRPOConfig()
    cfg.rollout.batch_size, cfg.trainer.mini_batch_size = 8, 4
    optimizer = build_optimizer(model, cfg.trainer)
    with pytest.raises(ValueError, match="one optimizer step"):
        policy_update(model, optimizer, build_scheduler(optimizer, cfg.trainer, 2), _samples(), 0, torch.device("cpu"),
                      contextlib.nullcontext, algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout,
                      model_cfg=cfg.model, moe_cfg=cfg.moe, old_from_update=True)
