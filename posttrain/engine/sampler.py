"""Token sampling for a batch of sequences with per-sequence settings.

The logprob returned for each sampled token is taken from ``log_softmax(logits / temperature)``
before any top-k/top-p/min-p filtering (temperature 1 for greedy rows): the distribution the
trainer's forward pass computes, so the PPO ratio compares like with like.

Rows with a seed draw from their own generator, so a seeded request is reproducible whatever
else is in the batch (see ``_draw`` for how a token is drawn on GPU and on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.engine.sequence import SequenceSampling


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None


class Sampler:
    def __call__(self, logits: torch.Tensor, settings: list[SequenceSampling]) -> SamplerOutput:
        """logits: (num_seqs, vocab), any float dtype. One host synchronisation per call."""
        device = logits.device
        first = settings[0]
        # The common case (one request's settings for the whole batch): scalar ops only.
        uniform = all(
            (s.temperature, s.top_p, s.top_k, s.min_p) == (first.temperature, first.top_p, first.top_k, first.min_p)
            and s.generator is None for s in settings
        )
        greedy_rows = [s.temperature <= 0 for s in settings]
        if uniform:
            temperature = first.temperature if first.temperature > 0 else 1.0
            logprobs_all = torch.log_softmax(logits.float().div_(temperature), dim=-1)
        else:
            temperatures = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in settings]).to(device)
            logprobs_all = torch.log_softmax(logits.float() / temperatures.unsqueeze(1), dim=-1)

        if all(greedy_rows):
            token_ids = logits.argmax(dim=-1)
        else:
            needs_filter = any(s.min_p > 0 or 0 < s.top_k < logits.shape[1] or s.top_p < 1.0 for s in settings)
            if needs_filter:
                scores = _filter(logprobs_all.exp(), settings).log()
            else:
                scores = logprobs_all
            token_ids = _draw(scores, settings)
            if any(greedy_rows):
                greedy = torch.tensor(greedy_rows).to(device)
                token_ids = torch.where(greedy, logits.argmax(dim=-1), token_ids)

        chosen = logprobs_all.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        k = max(s.top_logprobs for s in settings)
        if k > 0:
            values, indices = logprobs_all.topk(k, dim=-1)
            packed = torch.cat([token_ids.double().unsqueeze(1), chosen.double().unsqueeze(1), values.double(), indices.double()], 1)
            host = packed.tolist()
            top = [dict(zip((int(x) for x in row[2 + k : 2 + k + s.top_logprobs]), row[2 : 2 + s.top_logprobs]))
                   for row, s in zip(host, settings)]
            return SamplerOutput([int(r[0]) for r in host], [r[1] for r in host], top)
        host = torch.stack((token_ids.double(), chosen.double())).tolist()  # token ids < 2**53: exact
        return SamplerOutput([int(t) for t in host[0]], host[1], None)


def _draw(scores: torch.Tensor, settings: list[SequenceSampling]) -> torch.Tensor:
    """One token per row from ``softmax(scores)`` (scores: log-probabilities, -inf where filtered).

    GPU: Gumbel-max, ``argmax(scores - log E)`` with ``E ~ Exponential(1)``: a few fused passes and
    no host synchronisation. CPU: inverse-CDF sampling, one uniform number per row instead of one per
    vocabulary entry (drawing 50k exponentials, or ``multinomial``, costs 10% of a small model's step)."""
    if scores.is_cuda:
        noise = torch.empty_like(scores).exponential_()
        for i, s in enumerate(settings):
            if s.generator is not None:
                noise[i] = torch.empty(scores.shape[1], device=scores.device).exponential_(generator=s.generator)
        return (scores - noise.log_()).argmax(dim=-1)
    cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
    uniform = torch.rand(scores.shape[0], 1)
    for i, s in enumerate(settings):
        if s.generator is not None:
            uniform[i] = torch.rand(1, generator=s.generator)
    # The first token whose cumulative mass exceeds u * total (filtered tokens add no mass).
    picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)
    return picked.clamp_(max=scores.shape[1] - 1)


def _filter(probs: torch.Tensor, settings: list[SequenceSampling]) -> torch.Tensor:
    """Zero out tokens removed by top-k, top-p (nucleus) and min-p; rows without them are untouched."""
    device = probs.device
    top_k = [s.top_k for s in settings]
    top_p = [s.top_p for s in settings]
    min_p = [s.min_p for s in settings]
    if any(p > 0 for p in min_p):
        threshold = torch.tensor(min_p, device=device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if any(0 < k < probs.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[1]
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device).unsqueeze(1)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        remove = ranks >= ks
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
        ps = torch.tensor(top_p, device=device).unsqueeze(1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= ps * sorted_probs.sum(dim=-1, keepdim=True)
        remove[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(remove, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs
