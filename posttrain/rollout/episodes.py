"""Multi-turn episodes: generate, score, append the environment's observation, generate again.

An episode keeps its exact token sequence: the prompt ids, then per turn the engine's generated
ids (trainable, with the engine's logprobs) followed by the observation's ids (not trainable).
Text the model produced is never re-tokenized: a tokenizer need not round-trip (BPE merges across
the boundary between two turns, or decoding that normalises spaces), and training on ids other
than the sampled ones would make the PPO ratio and the loss refer to a sequence the policy never
produced.

Observation tokens come from the chat template. With ``P`` the rendered conversation up to the
current turn's generation prompt (the text the model continued), ``C`` the assistant message
text of this turn, and ``B`` the rendering of the conversation with the assistant message and the
observation and the next generation prompt, ``B`` must start with ``P + C``; the observation's
ids are ``tokenizer(B[len(P + C):])``. That suffix holds the end of the assistant turn (its
end-of-turn token is dropped when the engine already produced it), the observation message, and
the next assistant generation prompt. The assumption: the template renders earlier turns
identically whatever follows them (true of ChatML-style templates; false of templates that, for
example, strip the reasoning of earlier assistant turns). When it does not hold, a PosttrainError
says so instead of training on a sequence that differs from what the model saw.

Rewards: an episode's reward is the reward of its final step, i.e. the environment's reward when
it terminated, or at ``max_turns`` (then the episode is marked truncated). Metadata the
environment returns is carried to its next step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from posttrain.errors import PosttrainError
from posttrain.data.chat import TokenizedPrompt, format_prompt
from posttrain.sampling import Completion, RolloutEngine, SamplingParams


@dataclass
class Episode:
    """One multi-turn episode; quacks like a ``Completion`` for the trainer (token_ids, logprobs,
    text, finish_reason), with ``trainable_mask`` telling the model's tokens from observations.

    token_ids: everything after the prompt: model tokens and observation tokens, in order.
    logprobs: the engine's logprob per token; 0.0 on observation tokens (masked out).
    trainable_mask: 1 on the model's tokens, 0 on observation tokens; same length as token_ids.
    """

    prompt: TokenizedPrompt
    messages: list[dict[str, Any]]  # the conversation (prompt messages, then assistant / observation turns)
    metadata: dict[str, Any]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    trainable_mask: list[int] = field(default_factory=list)
    turns: int = 0
    finish_reason: str = "stop"  # of the last turn
    truncated: bool = False  # reached max_turns without the environment terminating it
    last_turn_tokens: int = 0
    observation_tokens: int = 0
    stop: list[str] | None = None  # stop strings of the next turn (None: the configured ones)
    # Text rendered so far (P + C of the module docstring), to check the next rendering against.
    rendered: str = ""

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prompt.token_ids

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages[len(self.prompt.messages):] if m.get("role") == "assistant")

    @property
    def sequence(self) -> list[int]:
        """The whole token sequence: prompt, then the response."""
        return list(self.prompt.token_ids) + self.token_ids


@dataclass
class EpisodeResults:
    """Final step of every episode, in input order (prompt-major, ``group_size`` per prompt)."""

    episodes: list[Episode]
    rewards: torch.Tensor  # (N,)
    metadata: list[dict[str, Any]]
    answers: list[Any]
    errors: list[str | None]
    generate_s: float = 0.0
    score_s: float = 0.0


def observation_token_ids(
    tokenizer: Any,
    rendered_so_far: str,
    messages: list[dict[str, Any]],
    ended_with_eos: bool,
    *,
    system_prompt: str = "",
) -> tuple[list[int], str]:
    """Ids (and text) of what follows the model's turn: the end of its turn, the observation,
    and the next generation prompt.

    rendered_so_far: the text of the conversation up to and including this turn's assistant
        content (without its end-of-turn token). messages: the conversation ending with the
        observation. ended_with_eos: whether the engine's output ended with the end-of-turn token
        (then the suffix starts after it).
    """
    full = format_prompt(messages, tokenizer, use_chat_template=True, system_prompt=system_prompt)
    if not full.startswith(rendered_so_far):
        raise PosttrainError(
            "multi-turn episode: the chat template renders the earlier turns of the conversation "
            "differently once an observation follows, so the observation's tokens cannot be cut from "
            "it without changing tokens the model already produced. Use a template that renders "
            "earlier turns identically (ChatML-style), or set rollout.max_turns=1.\n"
            f"expected prefix ends with: {rendered_so_far[-80:]!r}\nrendered: {full[len(rendered_so_far) - 80:len(rendered_so_far) + 40]!r}"
        )
    suffix = full[len(rendered_so_far):]
    eos = tokenizer.eos_token
    if ended_with_eos and eos:
        if not suffix.startswith(eos):
            raise PosttrainError(
                f"multi-turn episode: the model's turn ended with {eos!r} but the chat template does not "
                f"end an assistant turn with it (it renders {suffix[:40]!r}); rollout.max_turns > 1 needs "
                "the end-of-turn token to be the tokenizer's eos token."
            )
        suffix = suffix[len(eos):]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(ids), suffix


def _add_turn(episode: Episode, completion: Completion) -> None:
    episode.token_ids += completion.token_ids
    logprobs = list(completion.logprobs) or [0.0] * len(completion.token_ids)
    episode.logprobs += logprobs
    episode.trainable_mask += [1] * len(completion.token_ids)
    episode.messages = episode.messages + [{"role": "assistant", "content": completion.text}]
    episode.rendered += completion.text
    episode.turns += 1
    episode.finish_reason = completion.finish_reason
    episode.last_turn_tokens = len(completion.token_ids)


def _generate(engine: RolloutEngine, episodes: list[Episode], sampling: SamplingParams) -> None:
    """One more turn for each episode (n=1), one generate call per distinct stop-string list."""
    by_stop: dict[tuple[str, ...] | None, list[Episode]] = {}
    for e in episodes:
        by_stop.setdefault(tuple(e.stop) if e.stop is not None else None, []).append(e)
    for stop, group in by_stop.items():
        params = dataclasses.replace(sampling, n=1, stop=list(stop) if stop is not None else list(sampling.stop))
        for e, (completion,) in zip(group, engine.generate([e.sequence for e in group], params)):
            _add_turn(e, completion)


def run_episodes(
    engine: RolloutEngine,
    rewards: Any,
    prompts: Sequence[TokenizedPrompt],
    sampling: SamplingParams,
    tokenizer: Any,
    *,
    max_turns: int,
    system_prompt: str = "",
) -> EpisodeResults:
    """``sampling.n`` episodes per prompt of at most ``max_turns`` model turns each.

    ``rewards``: a RewardPool (anything with ``score(message_logs, metadata) -> ScoredBatch``).
    The first turn samples ``sampling.n`` completions per prompt (the group); later turns continue
    each live episode with n=1 from its exact token sequence, with the stop strings the
    environment returned (``next_stop_strings``) when it gave any.
    """
    eos_ids = set(getattr(engine, "eos_token_ids", None) or [tokenizer.eos_token_id])
    episodes: list[Episode] = []
    generate_s = score_s = 0.0
    start = time.perf_counter()
    groups = engine.generate([p.token_ids for p in prompts], sampling)
    for p, group in zip(prompts, groups):
        for completion in group:
            e = Episode(prompt=p, messages=list(p.messages), metadata=dict(p.metadata))
            e.rendered = format_prompt(p.messages, tokenizer, use_chat_template=True, system_prompt=system_prompt)
            _add_turn(e, completion)
            episodes.append(e)
    generate_s += time.perf_counter() - start
    n = len(episodes)
    final_rewards = torch.zeros(n, dtype=torch.float32)
    final_metadata: list[dict[str, Any]] = [e.metadata for e in episodes]
    answers: list[Any] = [None] * n
    errors: list[str | None] = [None] * n
    live = list(range(n))
    while live:
        start = time.perf_counter()
        scored = rewards.score([episodes[i].messages for i in live], [episodes[i].metadata for i in live])
        score_s += time.perf_counter() - start
        still_live = []
        for j, i in enumerate(live):
            e = episodes[i]
            final_rewards[i] = scored.rewards[j]
            final_metadata[i], answers[i] = scored.metadata[j], scored.answers[j]
            errors[i] = scored.errors[j] if scored.errors else None
            if bool(scored.terminateds[j]):
                continue
            if e.turns >= max_turns:
                e.truncated = True
                continue
            e.metadata = scored.metadata[j] if isinstance(scored.metadata[j], dict) else e.metadata
            e.stop = scored.next_stop_strings[j]
            ended_with_eos = bool(e.token_ids) and e.token_ids[-1] in eos_ids
            e.messages = e.messages + [scored.observations[j]]
            ids, suffix = observation_token_ids(tokenizer, e.rendered, e.messages, ended_with_eos, system_prompt=system_prompt)
            e.rendered += (tokenizer.eos_token if ended_with_eos else "") + suffix
            e.token_ids += ids
            e.logprobs += [0.0] * len(ids)
            e.trainable_mask += [0] * len(ids)
            e.observation_tokens += len(ids)
            still_live.append(i)
        live = still_live
        if live:
            start = time.perf_counter()
            _generate(engine, [episodes[i] for i in live], sampling)
            generate_s += time.perf_counter() - start
    return EpisodeResults(episodes, final_rewards, final_metadata, answers, errors, generate_s, score_s)


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """episode/turns_mean, episode/truncated_fraction (hit max_turns without terminating) and
    response/observation_tokens_mean (tokens per episode the model did not generate)."""
    n = max(len(episodes), 1)
    return {
        "episode/turns_mean": sum(e.turns for e in episodes) / n,
        "episode/truncated_fraction": sum(e.truncated for e in episodes) / n,
        "response/observation_tokens_mean": sum(e.observation_tokens for e in episodes) / n,
    }
