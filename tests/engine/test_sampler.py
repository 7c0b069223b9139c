import math

import torch

from posttrain.engine.sampler import Sampler, _filter
from posttrain.engine.sequence import SequenceSampling


def test_filters_keep_what_each_row_asks_for():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    settings = [
        SequenceSampling(top_k=2),
        SequenceSampling(top_p=0.7),  # 0.5 < 0.7, 0.5 + 0.3 crosses it: keep two
        SequenceSampling(min_p=0.35),  # keep p >= 0.35 * 0.5
        SequenceSampling(),
    ]
    kept = (_filter(probs, settings) > 0).tolist()
    assert kept == [[True, True, False, False], [True, True, False, False], [True, True, False, False], [True] * 4]


def test_greedy_and_sampled_logprobs_use_the_temperature_before_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out = Sampler()(logits, [SequenceSampling(temperature=0.0), SequenceSampling(temperature=0.5, top_k=1)])
    assert out.token_ids == [0, 1]
    expected0 = torch.log_softmax(logits[0], -1)[0].item()  # greedy: temperature 1
    expected1 = torch.log_softmax(logits[1] / 0.5, -1)[1].item()  # top-k does not change the logprob
    assert math.isclose(out.logprobs[0], expected0, abs_tol=1e-6) and math.isclose(out.logprobs[1], expected1, abs_tol=1e-6)


def test_sampling_frequencies_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).repeat(4000, 1)
    out = Sampler()(logits, [SequenceSampling(temperature=1.0)] * 4000)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(3, 50)

    def seeded(seed):
        return SequenceSampling(temperature=1.0, generator=torch.Generator().manual_seed(seed))

    alone = Sampler()(logits[:1], [seeded(3)]).token_ids[0]
    together = Sampler()(logits, [seeded(3), SequenceSampling(temperature=1.0), SequenceSampling(temperature=0.7)]).token_ids[0]
    assert alone == together


def test_top_logprobs_are_the_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = Sampler()(logits, [SequenceSampling(temperature=0.0, top_logprobs=2)])
    lp = torch.log_softmax(logits[0], -1)
    assert list(out.top_logprobs[0]) == [1, 3]
    assert math.isclose(out.top_logprobs[0][3], lp[3].item(), abs_tol=1e-6)
