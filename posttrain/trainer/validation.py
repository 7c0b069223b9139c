"""Greedy validation on held-out prompts."""

from __future__ import annotations

from typing import Any, Callable

from posttrain.envs.reward_pool import RewardPool
from posttrain.data.chat import TokenizedPrompt
from posttrain.errors import clip_text
from posttrain.sampling import RolloutEngine, SamplingParams


def validate(
    engine: RolloutEngine,
    rewards: RewardPool,
    prompts: list[TokenizedPrompt],
    *,
    max_tokens: int,
    stop: list[str],
    print_samples: int = 0,
    write: Callable[[str], None] = print,
    records: list[dict] | None = None,
) -> dict[str, float]:
    """Greedy-decode every prompt once, score it, and return ``val/*`` metrics. ``records``, when
    given, gets one dict per prompt (prompt, completion, reward, answer, expected, finish_reason):
    what validation_samples.jsonl holds."""
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, stop=list(stop), logprobs=False)
    completions = [group[0] for group in engine.generate([p.token_ids for p in prompts], params)]
    message_logs = [p.messages + [{"role": "assistant", "content": c.text}] for p, c in zip(prompts, completions)]
    scored = rewards.score(message_logs, [p.metadata for p in prompts])
    _, env_metrics = rewards.post_process(
        {"rewards": scored.rewards, "metadata": scored.metadata, "message_logs": message_logs, "answers": scored.answers}
    )
    lengths = [len(c.token_ids) for c in completions]
    metrics = {
        "val/reward_mean": scored.rewards.mean().item(),
        "val/response_length_mean": sum(lengths) / len(lengths),
        "val/truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
        **{f"val/{k}": float(v) for k, v in env_metrics.items()},
    }
    metrics.update(_per_level(prompts, scored.metadata, scored.rewards.tolist()))
    metrics.update(per_task_means(prompts, scored.rewards.tolist(), "val/{task}/reward_mean"))
    if records is not None:
        records.extend(
            {"prompt": p.messages[-1]["content"], "completion": c.text, "reward": r, "answer": _jsonable(answer),
             "expected": _jsonable(p.metadata.get("expected_answer")), "finish_reason": c.finish_reason}
            for p, c, r, answer in zip(prompts, completions, scored.rewards.tolist(), scored.answers)
        )
    for p, c, r, answer in list(zip(prompts, completions, scored.rewards.tolist(), scored.answers))[:print_samples]:
        # Bounded: the console and train.log get a few of these per validation; prompts can be megabytes.
        question = clip_text(p.messages[-1]["content"], 500)
        expected = clip_text(repr(p.metadata.get("expected_answer", "?")), 200)
        write(f"  [val] Q: {question}\n        A: {clip_text(c.text.strip())!r}\n        "
              f"extracted={clip_text(repr(answer), 200)} expected={expected} reward={r:.2f}")
    return metrics


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def per_task_means(prompts: list[Any], rewards: list[float], name: str) -> dict[str, float]:
    """Mean reward per task (``metadata["task"]`` of the prompts), as ``name.format(task=...)``;
    empty when no prompt names a task (single-task data)."""
    by_task: dict[str, list[float]] = {}
    for prompt, reward in zip(prompts, rewards):
        task = prompt.metadata.get("task")
        if task is not None:
            by_task.setdefault(str(task), []).append(reward)
    return {name.format(task=task): sum(v) / len(v) for task, v in sorted(by_task.items())}


def _per_level(prompts: list[TokenizedPrompt], scored_metadata: list[dict], rewards: list[float]) -> dict[str, float]:
    """Accuracy (or mean reward) per difficulty level, when prompts carry a ``level`` (the
    embedded arithmetic task does): the overall number hides which levels improved."""
    by_level: dict[object, list[float]] = {}
    for prompt, meta, reward in zip(prompts, scored_metadata, rewards):
        if "level" in prompt.metadata:
            value = float(meta["correct"]) if "correct" in meta else reward
            by_level.setdefault(prompt.metadata["level"], []).append(value)
    name = "accuracy" if scored_metadata and "correct" in scored_metadata[0] else "reward_mean"
    return {f"val/{name}_level_{level}": sum(v) / len(v) for level, v in sorted(by_level.items(), key=str)}
