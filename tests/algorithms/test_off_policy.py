"""Off-policy corrections (async GRPO, engine mismatch): hand-computed weights, metrics, config, update."""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.algorithms import (
    OFF_POLICY_CORRECTIONS,
    get_off_policy_correction,
    masked_sequence_counts,
    off_policy_metrics,
    resolved_off_policy_correction,
)
from posttrain.config import GRPOConfig, load_config
from posttrain.errors import ConfigError
from posttrain.trainer.optim import build_optimizer, build_scheduler, clip_and_step
from posttrain.trainer.policy import policy_update
from posttrain.trainer.samples import Sample

# Token ratios pi_old / pi_behaviour. Row 1 ends in padding whose (garbage) ratio is e^50; row 2 is
# a sequence with no valid token at all (e.g. an untrainable sample), whose ratios must not count.
RATIOS = [[1.5, 1.0, 0.25], [4.0, 0.6, math.exp(50.0)], [3.0, 3.0, 3.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
VALID_RATIOS = [1.5, 1.0, 0.25, 4.0, 0.6]


def _inputs():
    behaviour = -torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    old = behaviour + torch.tensor(RATIOS, dtype=torch.float64).log().float()
    return old, behaviour, MASK


def _weights(name, **options):
    old, behaviour, mask = _inputs()
    options = {"cap": 2.0, "low": 0.5, "high": 2.0, **options}
    return get_off_policy_correction(name)(old, behaviour, mask, **options)


def test_none_is_the_mask():
    torch.testing.assert_close(_weights("none"), MASK.float())


def test_tis_token_by_hand():
    torch.testing.assert_close(_weights("tis_token", cap=2.0),
                               torch.tensor([[1.5, 1.0, 0.25], [2.0, 0.6, 0.0], [0.0, 0.0, 0.0]]))


def test_tis_seq_by_hand():
    # Products of valid ratios: row 0 1.5 * 1 * 0.25 = 0.375, row 1 4 * 0.6 = 2.4 (the padding is left out).
    torch.testing.assert_close(_weights("tis_seq", cap=3.0),
                               torch.tensor([[0.375] * 3, [2.4, 2.4, 0.0], [0.0] * 3]))
    torch.testing.assert_close(_weights("tis_seq", cap=2.0),
                               torch.tensor([[0.375] * 3, [2.0, 2.0, 0.0], [0.0] * 3]))


def test_geo_mask_by_hand():
    # Geometric means: row 0 0.375 ** (1/3) = 0.721, row 1 2.4 ** (1/2) = 1.549.
    kept_both = torch.tensor([[1.0] * 3, [1.0, 1.0, 0.0], [0.0] * 3])
    torch.testing.assert_close(_weights("geo_mask", low=0.5, high=2.0), kept_both)
    torch.testing.assert_close(_weights("geo_mask", low=0.75, high=2.0),
                               torch.tensor([[0.0] * 3, [1.0, 1.0, 0.0], [0.0] * 3]))
    torch.testing.assert_close(_weights("geo_mask", low=0.5, high=1.5),
                               torch.tensor([[1.0] * 3, [0.0] * 3, [0.0] * 3]))


def test_icepop_by_hand():
    torch.testing.assert_close(_weights("icepop", low=0.5, high=2.0),
                               torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0] * 3]))
    torch.testing.assert_close(_weights("icepop", low=0.2, high=5.0), MASK.float())


@pytest.mark.parametrize("name", OFF_POLICY_CORRECTIONS.names())
def test_every_correction_is_detached_float32_and_zero_on_padding(name):
    old, behaviour, mask = _inputs()
    old = old.bfloat16().requires_grad_()
    weights = get_off_policy_correction(name)(old, behaviour.bfloat16(), mask, cap=2.0, low=0.5, high=2.0)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    assert weights.shape == (3, 3) and (weights[~mask.bool()] == 0).all()
    assert torch.isfinite(weights).all()


def test_infinite_logprobs_stay_finite():
    old = torch.tensor([[0.0, -math.inf, -1.0]])
    behaviour = torch.tensor([[-math.inf, -1.0, -1.0]])
    for name in OFF_POLICY_CORRECTIONS:
        weights = get_off_policy_correction(name)(old, behaviour, torch.ones(1, 3), cap=2.0, low=0.5, high=2.0)
        assert torch.isfinite(weights).all(), name


def test_bad_keywords_raise():
    with pytest.raises(ValueError, match="cap"):
        _weights("tis_seq", cap=0.0)
    with pytest.raises(ValueError, match="low"):
        _weights("icepop", low=2.0, high=0.5)


def test_unknown_correction_suggests_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'icepop'"):
        get_off_policy_correction("icepopp")


def test_metrics_by_hand():
    old, behaviour, mask = _inputs()
    metrics = off_policy_metrics(old, behaviour, mask, _weights("icepop"))
    r = np.array(VALID_RATIOS)
    # k3 of KL(behaviour || old) with r = old / behaviour: (r - 1) - log r, averaged over valid tokens.
    assert metrics["off_policy/mismatch_kl"] == pytest.approx(float(np.mean(r - 1 - np.log(r))), rel=1e-5)
    assert metrics["off_policy/is_ratio_mean"] == pytest.approx(7.35 / 5, rel=1e-5)
    # Sorted 0.25, 0.6, 1, 1.5, 4; linear interpolation at 0.05 * 4 = 0.2 and 0.95 * 4 = 3.8.
    assert metrics["off_policy/is_ratio_p05"] == pytest.approx(0.25 + 0.2 * 0.35, rel=1e-5)
    assert metrics["off_policy/is_ratio_p50"] == pytest.approx(1.0, rel=1e-5)
    assert metrics["off_policy/is_ratio_p95"] == pytest.approx(1.5 + 0.8 * 2.5, rel=1e-5)
    assert metrics["off_policy/is_ratio_max"] == pytest.approx(4.0, rel=1e-5)
    # icepop [0.5, 2] drops the ratios 0.25 and 4: 2 of 5 valid tokens.
    assert metrics["off_policy/masked_fraction"] == pytest.approx(0.4)
    assert metrics["off_policy/weight_mean"] == pytest.approx(0.6)
    # Sequences: rows 0 and 1 (row 2 has no valid token); each lost one token, none lost all.
    assert metrics["off_policy/masked_seq_fraction"] == 1.0
    assert metrics["off_policy/dropped_seq_fraction"] == 0.0
    assert off_policy_metrics(old, behaviour, torch.zeros(3, 3), torch.zeros(3, 3)) == {}


def test_sequence_fractions_of_geo_mask_by_hand():
    old, behaviour, mask = _inputs()
    # Geometric means 0.721 (row 0) and 1.549 (row 1): [0.75, 2] drops row 0 whole.
    metrics = off_policy_metrics(old, behaviour, mask, _weights("geo_mask", low=0.75, high=2.0))
    assert metrics["off_policy/masked_seq_fraction"] == 0.5
    assert metrics["off_policy/dropped_seq_fraction"] == 0.5
    assert metrics["off_policy/masked_fraction"] == pytest.approx(3 / 5)
    assert masked_sequence_counts(_weights("geo_mask", low=0.75, high=2.0), mask) == (2, 1, 1)
    assert masked_sequence_counts(_weights("none"), mask) == (2, 0, 0)


# ---------------------------------------------------------------- config


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(GRPOConfig, overrides=list(overrides))
    return str(info.value)


def test_config_unknown_name_suggests_the_nearest():
    message = _config_error("algorithm.off_policy_correction=geo_mak")
    assert "algorithm.off_policy_correction" in message and "Did you mean 'geo_mask'" in message


def test_config_bad_bounds():
    message = _config_error("algorithm.off_policy_cap=0", "algorithm.off_policy_low=1.2", "algorithm.off_policy_high=3")
    assert "algorithm.off_policy_cap=0.0 must be > 0" in message
    assert "algorithm.off_policy_low=1.2 and algorithm.off_policy_high=3.0" in message
    assert "0 < low < 1 < high" in _config_error("algorithm.off_policy_low=0.5", "algorithm.off_policy_high=0.9")


def test_config_legacy_cap_beside_another_correction_is_an_error():
    message = _config_error("algorithm.is_correction_cap=2", "algorithm.off_policy_correction=icepop")
    assert "algorithm.is_correction_cap=2.0" in message and "algorithm.off_policy_correction=icepop" in message
    cfg = load_config(GRPOConfig, overrides=["algorithm.is_correction_cap=2", "algorithm.off_policy_correction=tis_token"])
    with pytest.warns(FutureWarning, match="is_correction_cap=2 is deprecated"):
        assert resolved_off_policy_correction(cfg.algorithm)[:2] == ("tis_token", 2.0)


def test_resolved_correction():
    algo = GRPOConfig().algorithm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keys alone: no deprecation warning
        assert resolved_off_policy_correction(algo).name == "none"
    algo.is_correction_cap = 1.5
    with pytest.warns(FutureWarning, match=r"algorithm.is_correction_cap=1.5 is deprecated.*"
                      r"algorithm.off_policy_correction=tis_token algorithm.off_policy_cap=1.5"):
        assert resolved_off_policy_correction(algo) == ("tis_token", 1.5, 0.5, 2.0)
    algo.is_correction_cap, algo.off_policy_correction, algo.off_policy_cap = 0.0, "tis_seq", 3.0
    assert resolved_off_policy_correction(algo)[:2] == ("tis_seq", 3.0)


# ---------------------------------------------------------------- policy update


def _samples(huge_ratio_at: tuple[int, int] | None = None, shift: float = 0.0) -> list[Sample]:
    """Rollout (behaviour) logprobs a random +-0.3 from the trainer's, plus ``shift`` below them.

    The old logprobs are near 0, far above the tiny model's (about -log V), and the advantages
    positive: every token's ratio is below 1 - clip_ratio_low, where PPO's clip passes the gradient
    (a clipped token would have none to drop)."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(4):
        prompt = torch.randint(4, 90, (3 + i,), generator=g).tolist()
        response = torch.randint(4, 90, (3 + 2 * i,), generator=g).tolist()
        old = (-torch.rand(len(response), generator=g) * 0.1).tolist()
        noise = ((torch.rand(len(response), generator=g) - 0.5) * 0.6).tolist()
        behaviour = [lp + n - shift for lp, n in zip(old, noise)]
        samples.append(Sample(prompt, response, old, advantage=0.5 + 0.25 * i, reward=0.0,
                              rollout_logprobs=behaviour))
    if huge_ratio_at is not None:
        i, t = huge_ratio_at
        samples[i].rollout_logprobs[t] = samples[i].old_logprobs[t] - 10.0  # ratio e^10
    return samples


def _update(samples, *overrides: str, monkeypatch):
    """One update of a fresh tiny model; returns its gradients (before the optimizer step) and metrics."""
    import posttrain.trainer.policy as policy

    cfg = load_config(GRPOConfig, overrides=[
        "rollout.batch_size=4", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "trainer.micro_batch_tokens=0",
        "rollout.group_size=2", "rollout.max_new_tokens=16", "trainer.max_grad_norm=0",
        # A normaliser that does not depend on which tokens are masked (token-mean's would).
        "algorithm.loss_agg_mode=seq-mean-token-sum-norm", *overrides,
    ])
    grads = []

    def recording_step(optimizer, parameters, max_norm):
        parameters = list(parameters)
        grads.extend(p.grad.clone() for p in parameters)
        return clip_and_step(optimizer, parameters, max_norm)

    monkeypatch.setattr(policy, "clip_and_step", recording_step)
    torch.manual_seed(0)
    model = make_tiny_llama(make_tokenizer())
    optimizer = build_optimizer(model, cfg.trainer)
    metrics = policy_update(model, optimizer, build_scheduler(optimizer, cfg.trainer, 1), samples,
                            0, torch.device("cpu"), contextlib.nullcontext,
                            algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                            moe_cfg=cfg.moe)
    return torch.cat([g.flatten() for g in grads]), metrics


def test_icepop_drops_the_gradient_of_a_token_with_a_huge_ratio(monkeypatch):
    huge = (2, 4)
    icepop, metrics = _update(_samples(huge), "algorithm.off_policy_correction=icepop", monkeypatch=monkeypatch)
    # The same update with that one token left out of the loss (and no correction).
    left_out = _samples(huge)
    left_out[2].response_mask = [0 if t == huge[1] else 1 for t in range(len(left_out[2].response_ids))]
    masked, _ = _update(left_out, "algorithm.off_policy_correction=none", monkeypatch=monkeypatch)
    torch.testing.assert_close(icepop, masked)
    # Without the correction the token does contribute.
    plain, plain_metrics = _update(_samples(huge), "algorithm.off_policy_correction=none", monkeypatch=monkeypatch)
    assert (plain - icepop).norm() > 0.01 * plain.norm()

    num_tokens = sum(len(s.response_ids) for s in _samples())
    assert metrics["off_policy/masked_fraction"] == pytest.approx(1 / num_tokens)  # noise stays inside [0.5, 2]
    assert metrics["off_policy/masked_seq_fraction"] == 0.25 and metrics["off_policy/dropped_seq_fraction"] == 0.0
    assert metrics["off_policy/is_ratio_max"] == pytest.approx(math.exp(10.0), rel=1e-4)
    assert metrics["actor/is_weight"] == pytest.approx(1 - 1 / num_tokens)
    # With 'none' the mismatch is still measured, and nothing is masked.
    assert plain_metrics["off_policy/masked_fraction"] == 0.0 and plain_metrics["off_policy/weight_mean"] == 1.0
    assert plain_metrics["off_policy/mismatch_kl"] == pytest.approx(metrics["off_policy/mismatch_kl"])
    assert "actor/is_weight" not in plain_metrics


def test_is_correction_cap_is_tis_token(monkeypatch):
    with pytest.warns(FutureWarning, match="is_correction_cap=1.5 is deprecated"):
        legacy, m_legacy = _update(_samples(shift=0.5), "algorithm.is_correction_cap=1.5", monkeypatch=monkeypatch)
    named, m_named = _update(_samples(shift=0.5), "algorithm.off_policy_correction=tis_token",
                             "algorithm.off_policy_cap=1.5", monkeypatch=monkeypatch)
    torch.testing.assert_close(legacy, named)
    assert m_legacy == pytest.approx(m_named)
    # The shift puts many ratios above the cap: the weights are truncated.
    assert m_named["off_policy/is_ratio_max"] > 1.5 and m_named["actor/is_weight"] < m_named["off_policy/is_ratio_mean"]
    none, _ = _update(_samples(shift=0.5), monkeypatch=monkeypatch)
    assert (none - named).norm() > 0.01 * none.norm()


def test_samples_without_rollout_logprobs_still_log_the_metrics(monkeypatch):
    """rollout.backend=hf (or recompute_logprobs=false): the engine's logprobs are the old policy,
    so the behaviour policy is the old one and the metrics say so: ratio 1, no mismatch, nothing masked."""
    samples = _samples()
    for s in samples:
        s.rollout_logprobs = None
    _, metrics = _update(samples, "algorithm.off_policy_correction=none", monkeypatch=monkeypatch)
    assert metrics["off_policy/mismatch_kl"] == 0.0
    for q in ("p05", "p50", "p95", "max", "mean"):
        assert metrics[f"off_policy/is_ratio_{q}"] == 1.0
    assert metrics["off_policy/masked_fraction"] == metrics["off_policy/masked_seq_fraction"] == 0.0
