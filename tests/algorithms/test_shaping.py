from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import informative_groups, overlong_penalty


def test_overlong_penalty_by_hand():
    # max_len 20, buffer 8: ramp from 12 tokens (0) to 20 tokens (-penalty).
    lengths = torch.tensor([5, 12, 13, 16, 20, 25])
    out = overlong_penalty(lengths, max_len=20, buffer_len=8, penalty=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1 / 8, -0.5, -1.0, -1.0]))
    out = overlong_penalty(lengths, max_len=20, buffer_len=8, penalty=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1 / 16, -0.25, -0.5, -0.5]))


def test_overlong_penalty_off_and_errors():
    assert torch.equal(overlong_penalty(torch.tensor([3, 100]), max_len=10, buffer_len=0), torch.zeros(2))
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer_len=11)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer_len=2, penalty=-1.0)


def test_informative_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.2])
    assert informative_groups(rewards, 2).tolist() == [False, True, False]
    assert informative_groups(rewards, 3).tolist() == [True, True]
    with pytest.raises(ValueError):
        informative_groups(rewards, 4)
