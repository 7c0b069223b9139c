"""The shared vocabulary of generation: what is asked (``SamplingParams``), what comes back
(``Completion``), what any generation backend offers the trainer (``RolloutEngine``), and what ends
a completion (EOS ids, stop strings).

A leaf module: the engine, the rollout sources, weight sync and the servers all import it, and it
imports nothing of posttrain, so none of them has to import another's package for these types.

Stop strings are matched in the generated text only (as in the OpenAI API), never in text that
straddles the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """How to sample completions. ``top_k=0`` and ``top_p=1.0`` switch those filters off;
    ``temperature=0`` means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True  # return the logprob of each sampled token
    top_logprobs: int = 0  # also return this many most likely tokens' logprobs per position
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (0: off)
    stop_token_ids: list[int] = field(default_factory=list)  # end a completion at any of these (kept, like EOS)
    ignore_eos: bool = False  # keep generating after EOS, up to max_tokens (benchmarks)


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the policy's sampling
    distribution (logits divided by the temperature, before top-k/top-p filtering): the
    "old" logprobs of the PPO ratio.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    top_logprobs: list[dict[int, float]] | None = None  # per position: token id -> logprob
    # Per token: the engine's weight version that sampled it. One completion can span versions
    # when weights change mid-generation (partial rollouts); None: the engine does not know.
    token_versions: list[int] | None = None
    # MoE models on posttrain's engine: the expert ids that each MoE layer's router chose (top-k)
    # for each token the engine ran through the model, int16 (num_moe_layers, len(prompt_token_ids)
    # + len(token_ids) - 1, top_k) on the CPU. Row p is the token at position p of prompt +
    # completion; the last completion token has no row (it was sampled, never run), and its
    # routing changes no logprob of the completion. None: a dense model or another backend.
    routed_experts: torch.Tensor | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample ``params.n`` completions for each prompt (given as token ids).

        Returns one list of ``n`` completions per prompt, in prompt order."""
        ...

    def update_weights(self, named_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """The policy changed. ``named_tensors``: new weights to load; None: the engine shares the
        trainer's modules, which were updated in place (it only drops state computed with the old
        weights, e.g. cached prefixes)."""
        ...

    def sleep(self) -> None:
        """Release generation memory (KV cache, graphs) while the trainer runs on the same device."""
        ...

    def wake(self) -> None:
        """Re-acquire what ``sleep`` released, before the next generation."""
        ...


# ---- what ends a completion, shared by every engine

def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokenizer's EOS plus every EOS of the model's generation config (chat models often add
    an end-of-turn token there)."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(ids)


def stop_window(stops: Sequence[str]) -> int:
    """Tokens at the end of a completion that cover any stop string: every token decodes to at
    least one character."""
    return max(len(s) for s in stops) + 1


def tail_has_stop(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> bool:
    """Cheap per-step check: does the decoded tail of ``tokens`` contain a stop string?"""
    text = tokenizer.decode(tokens[-stop_window(stops):])
    return any(s in text for s in stops)


def stop_string_end(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> int | None:
    """Length of the shortest prefix of ``tokens`` whose text contains a stop string, or None."""
    text = tokenizer.decode(tokens)
    if not any(s in text for s in stops):
        return None
    # Rare enough (once per stopped completion) that a linear scan is fine.
    for k in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:k]) for s in stops):
            return k
    return None
