from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import aggregate_loss, entropy_from_logits, kl_penalty, ppo_clip_loss
from posttrain.errors import ConfigError

RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5]


def _logratio(ratios) -> torch.Tensor:
    return torch.tensor(ratios).log()


# ---------------------------------------------------------------- ppo_clip_loss


def test_ppo_clip_positive_and_negative_advantages():
    logprobs = torch.stack([_logratio(RATIOS), _logratio(RATIOS)])
    old = torch.zeros(2, 5)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask)
    # A=+1: -min(r, clip(r, 0.8, 1.2)); only r=1.5 is clipped (to 1.2).
    # A=-1:  max(r, clip(r, 0.8, 1.2)); only r=0.5 is clipped (to 0.8).
    expected = torch.tensor([[-0.5, -0.9, -1.0, -1.1, -1.2], [0.8, 0.9, 1.0, 1.1, 1.5]])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 10))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(10.0 / 10))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.5))
    # k3 of KL(old || new) = r - 1 - log r per token.
    k3 = sum(r - 1 - math.log(r) for r in RATIOS) / 5
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(k3))
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


def test_ppo_clip_asymmetric_bounds():
    # clip range [0.8, 1.28] (DAPO clip-higher)
    logprobs = torch.stack([_logratio([1.25, 1.3]), _logratio([0.85, 0.75])])
    loss, metrics = ppo_clip_loss(
        logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2),
        clip_ratio_low=0.2, clip_ratio_high=0.28,
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28], [0.85, 0.8]]))
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(0.5))


def test_ppo_clip_zero_advantage_never_clips():
    loss, metrics = ppo_clip_loss(_logratio([[3.0, 0.1]]), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))
    assert torch.equal(loss, torch.zeros(1, 2))
    assert metrics["clip_fraction"].item() == 0.0


def test_ppo_clip_masked_tokens_are_ignored():
    logprobs = torch.stack([_logratio([1.1, 3.0]), _logratio([0.5, 1.0])])
    mask = torch.tensor([[1, 0], [1, 1]])
    loss, metrics = ppo_clip_loss(logprobs, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.1, 0.0], [0.8, 1.0]]))
    # Valid tokens: 1.1 (A=+1), 0.5 (A=-1, clipped), 1.0 -> the masked 3.0 is not the max.
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(1 / 3))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(2.6 / 3))
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(1.1))


def test_ppo_clip_per_token_advantages():
    logprobs = _logratio([[1.5, 1.5]])
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, -2.0]]), torch.ones(1, 2))
    torch.testing.assert_close(loss, torch.tensor([[-2.4, 3.0]]))


def test_ppo_clip_gradient_is_zero_for_clipped_tokens():
    logprobs = torch.stack([_logratio(RATIOS), _logratio(RATIOS)]).requires_grad_(True)
    loss, _ = ppo_clip_loss(logprobs, torch.zeros(2, 5), torch.tensor([1.0, -1.0]), torch.ones(2, 5))
    loss.sum().backward()
    # d(-r * A)/d logp = -r * A where unclipped; 0 where the clipped term is active.
    expected = torch.tensor([[-0.5, -0.9, -1.0, -1.1, 0.0], [0.0, 0.9, 1.0, 1.1, 1.5]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_ppo_clip_extreme_log_ratio_stays_finite():
    logprobs = torch.tensor([[0.0, -1e4]], requires_grad=True)
    old = torch.tensor([[-1e4, 0.0]])
    loss, metrics = ppo_clip_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def test_ppo_clip_shape_errors():
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ---------------------------------------------------------------- kl_penalty


def test_kl_estimators_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0, 0.0]])  # d = logp - ref = [1, 0, -2]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, 0.0, -2.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.5, 0.0, 2.0]]))
    # k3 = exp(-d) + d - 1
    k3 = [math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([k3]))


def test_k3_is_nonnegative_and_finite():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(8, 16, generator=g) * 3, torch.randn(8, 16, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    extreme = kl_penalty(torch.tensor([1e4, -1e4]), torch.tensor([-1e4, 1e4]), "k3")
    assert torch.isfinite(extreme).all() and (extreme >= 0).all()


def test_unknown_kl_estimator():
    with pytest.raises(ConfigError) as info:
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    assert "k1, k2, k3" in str(info.value)


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_vocab():
    for value in (0.0, 1000.0):  # a large constant must not overflow
        out = entropy_from_logits(torch.full((2, 3, 7), value))
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, torch.full((2, 3), math.log(7)))


def test_entropy_by_hand_and_near_one_hot():
    # logits [0, log 3] -> p = [1/4, 3/4]
    out = entropy_from_logits(torch.tensor([[0.0, math.log(3)], [100.0, 0.0]]))
    expected_first = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(out[0], torch.tensor(expected_first))
    assert 0.0 <= out[1].item() < 1e-6


def test_entropy_chunking_bf16_and_grad():
    logits = torch.randn(5, 3, 11, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    full = entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), full)
    out = entropy_from_logits(logits.detach().bfloat16())
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    full.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- aggregate_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, float("nan"), 0.0], [7.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # third sequence: no valid token


def test_token_mean_by_hand():
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "token-mean"), torch.tensor(21 / 6))
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "token-mean", num_tokens=7), torch.tensor(3.0))


def test_seq_mean_token_mean_by_hand():
    # per-sequence means 2.5, 5.5 and 0 (empty) over 3 sequences
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), torch.tensor(8 / 3))
    torch.testing.assert_close(
        aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_sequences=4), torch.tensor(2.0)
    )


def test_seq_mean_token_sum_norm_by_hand():
    torch.testing.assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm"), torch.tensor(21 / 12))
    torch.testing.assert_close(
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", num_sequences=5, norm_length=10),
        torch.tensor(21 / 50),
    )


def test_aggregate_errors():
    with pytest.raises(ConfigError, match="Did you mean 'token-mean'"):
        aggregate_loss(LOSS, MASK, "token_mean")
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "token-mean", num_tokens=0)
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    batch, length = 7, 6
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    loss = torch.randn(batch, length, generator=g).requires_grad_(True)
    global_kwargs = dict(num_tokens=mask.sum().item(), num_sequences=batch, norm_length=length)

    full = aggregate_loss(loss, mask, mode, **global_kwargs)
    (full_grad,) = torch.autograd.grad(full, loss)

    total = torch.zeros(())
    for start, end in [(0, 1), (1, 4), (4, 7)]:  # uneven micro-batches
        # Each micro-batch is padded only to its own longest answer, as a collator would.
        width = max(int(lengths[start:end].max()), 1)
        total = total + aggregate_loss(loss[start:end, :width], mask[start:end, :width], mode, **global_kwargs)
    (micro_grad,) = torch.autograd.grad(total, loss)

    torch.testing.assert_close(total, full)
    torch.testing.assert_close(micro_grad, full_grad)


def test_micro_batches_with_local_normalisers_do_not_match():
    # Why the global normalisers exist: local token counts weigh tokens differently.
    loss, mask = torch.tensor([[1.0, 1.0], [3.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    full = aggregate_loss(loss, mask, "token-mean")  # 5 / 3
    local = aggregate_loss(loss[:1], mask[:1], "token-mean") + aggregate_loss(loss[1:], mask[1:], "token-mean")
    assert not torch.isclose(full, local)
