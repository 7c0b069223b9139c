"""clip_and_step: one clip-and-step for every trainer, skipping non-finite gradients."""

import copy

import pytest
import torch

from posttrain.trainer.optim import clip_and_step


def _model_and_optimizer(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)


def _backward(model, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    (model(torch.ones(2, 4)).sum() * scale).backward()


@pytest.mark.parametrize("fused", [True, False])
def test_finite_gradients_are_clipped_and_stepped(fused):
    model, optimizer = _model_and_optimizer(fused)
    reference = copy.deepcopy(model)
    _backward(model)
    _backward(reference)
    want_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.1).step()
    norm = clip_and_step(optimizer, model.parameters(), 0.5)
    assert norm.dim() == 0 and float(norm) == pytest.approx(float(want_norm))
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)
    assert not hasattr(optimizer, "found_inf")


@pytest.mark.parametrize("fused", [True, False])  # fused: the kernel skips (found_inf); else the host does
def test_a_non_finite_gradient_skips_the_whole_update(fused):
    model, optimizer = _model_and_optimizer(fused)
    _backward(model)
    clip_and_step(optimizer, model.parameters(), 1.0)  # one real step: moments and step count exist
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict())
    _backward(model, scale=float("inf"))
    norm = clip_and_step(optimizer, model.parameters(), 1.0)
    assert not torch.isfinite(norm)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, state_before["state"][index][key], rtol=0, atol=0, msg=key)
    _backward(model)  # and training goes on
    assert torch.isfinite(clip_and_step(optimizer, model.parameters(), 1.0))
    assert optimizer.state_dict()["state"][0]["step"].item() == 2
