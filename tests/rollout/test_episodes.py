"""Multi-turn episodes with a scripted engine and the character-level tokenizer: the exact token
sequence, observation tokens cut from the chat template, the loss mask, and no retokenization."""

from __future__ import annotations

import json

import pytest

from helpers import make_tokenizer, save_tiny_model
from posttrain.envs.reward_pool import RewardPool
from posttrain.data.chat import TokenizedPrompt, format_prompt
from posttrain.sampling import Completion, RolloutEngine, SamplingParams
from posttrain.rollout.episodes import episode_metrics, observation_token_ids, run_episodes
from posttrain.trainer.samples import Sample, collate


class ScriptedEngine:
    """Returns predetermined texts (as token ids) per generate call: ``script[call][prompt][k]``."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []
        self.eos_token_ids = [tokenizer.eos_token_id]

    def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], params))
        out = []
        for p, texts in zip(prompts, self.script[len(self.calls) - 1]):
            assert len(texts) == params.n
            group = []
            for text in texts:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                group.append(Completion(list(p), ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                        [-0.01 * (k + 1) for k in range(len(ids))], "stop"))
            out.append(group)
        return out

    def update_weights(self, named_tensors=None):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def pool():
    with RewardPool("calculator", {}, num_workers=0, timeout_s=10.0) as p:
        yield p


def _prompt(tokenizer, question="What is 2+3?"):
    messages = [{"role": "user", "content": question}]
    text = format_prompt(messages, tokenizer, use_chat_template=True)
    return TokenizedPrompt(tokenizer(text, add_special_tokens=False)["input_ids"], messages, {"expected_answer": "5"})


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tool_call_then_answer_exact_tokens(tokenizer, pool):
    prompt = _prompt(tokenizer)
    engine = ScriptedEngine(tokenizer, [
        [["<calc>2+3</calc>", "answer 5<|im_end|>"]],  # turn 1: a group of 2
        [["answer 5<|im_end|>"]],  # turn 2: the live episode only
    ])
    assert isinstance(engine, RolloutEngine)
    result = run_episodes(engine, pool, [prompt], SamplingParams(n=2, stop=[]), tokenizer, max_turns=3)
    tool_ep, direct_ep = result.episodes
    assert result.rewards.tolist() == [1.0, 1.0]
    assert (tool_ep.turns, direct_ep.turns) == (2, 1) and not tool_ep.truncated

    turn1, turn2 = _ids(tokenizer, "<calc>2+3</calc>"), _ids(tokenizer, "answer 5<|im_end|>")
    suffix = "<|im_end|>\n<|im_start|>tool\n<result>5</result><|im_end|>\n<|im_start|>assistant\n"
    observation = _ids(tokenizer, suffix)
    # The observation tokens are the template-rendered suffix of the conversation.
    assert [m["role"] for m in tool_ep.messages] == ["user", "assistant", "tool", "assistant"]
    rendered = format_prompt(tool_ep.messages[:3], tokenizer, use_chat_template=True)  # up to the observation
    assert rendered.endswith(suffix) and rendered == format_prompt(prompt.messages, tokenizer, use_chat_template=True) + "<calc>2+3</calc>" + suffix
    assert tool_ep.sequence == prompt.token_ids + turn1 + observation + turn2
    # The second generation continued from exactly that sequence, n=1, with the env's stop strings.
    prompts2, params2 = engine.calls[1]
    assert prompts2 == [prompt.token_ids + turn1 + observation]
    assert params2.n == 1 and params2.stop == ["</calc>"]
    assert tool_ep.trainable_mask == [1] * len(turn1) + [0] * len(observation) + [1] * len(turn2)
    assert tool_ep.logprobs[len(turn1): len(turn1) + len(observation)] == [0.0] * len(observation)
    assert direct_ep.sequence == prompt.token_ids + turn2 and direct_ep.trainable_mask == [1] * len(turn2)

    # The model-token segments are byte-identical to what the engine produced.
    P = len(prompt.token_ids)
    assert tool_ep.sequence[P: P + len(turn1)] == turn1
    assert tool_ep.sequence[P + len(turn1) + len(observation):] == turn2
    # No retokenization drift for this tokenizer: decode + encode round-trips.
    assert _ids(tokenizer, tokenizer.decode(tool_ep.sequence)) == tool_ep.sequence

    # Loss mask: 1 exactly on the model's tokens; old logprobs 0 (and masked) on observations.
    samples = [Sample(e.prompt.token_ids, e.token_ids, e.logprobs, 0.0, 1.0, response_mask=e.trainable_mask)
               for e in result.episodes]
    batch = collate(samples, tokenizer.pad_token_id, "cpu")
    assert batch.loss_mask[0].tolist() == [float(m) for m in tool_ep.trainable_mask]
    assert batch.loss_mask[1].tolist() == [1.0] * len(turn2) + [0.0] * (len(tool_ep.token_ids) - len(turn2))
    assert samples[0].num_loss_tokens == len(turn1) + len(turn2)

    assert episode_metrics(result.episodes) == {
        "episode/turns_mean": 1.5, "episode/truncated_fraction": 0.0,
        "response/observation_tokens_mean": len(observation) / 2,
    }


def test_eos_ended_turn_and_truncation_at_max_turns(tokenizer, pool):
    prompt = _prompt(tokenizer)
    engine = ScriptedEngine(tokenizer, [[["<calc>2*3</calc><|im_end|>"]], [["<calc>1+1</calc>"]]])
    result = run_episodes(engine, pool, [prompt], SamplingParams(n=1), tokenizer, max_turns=2)
    (e,) = result.episodes
    assert e.truncated and e.turns == 2 and result.rewards.tolist() == [0.0]
    turn1 = _ids(tokenizer, "<calc>2*3</calc><|im_end|>")
    # The engine already ended the turn: the observation starts after its end-of-turn token.
    observation = _ids(tokenizer, "\n<|im_start|>tool\n<result>6</result><|im_end|>\n<|im_start|>assistant\n")
    assert e.sequence == prompt.token_ids + turn1 + observation + _ids(tokenizer, "<calc>1+1</calc>")
    assert episode_metrics([e])["episode/truncated_fraction"] == 1.0


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    from posttrain.errors import PosttrainError

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "o"}]
    with pytest.raises(PosttrainError, match="renders the earlier turns"):
        observation_token_ids(tokenizer, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nDIFFERENT", messages, False)


def test_grpo_cli_multi_turn_calculator(tmp_path):
    from posttrain.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    args = ["grpo", f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.max_steps=1",
            "rollout.batch_size=4", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_turns=3",
            "trainer.mini_batch_size=4", "trainer.micro_batch_size=2", "algorithm.kl_coef=0",
            "data.arithmetic.difficulty=1", "data.arithmetic.num_train=8", "data.arithmetic.num_validation=2",
            "validation.at_start=false", "validation.at_end=false", "env.cls=calculator", "env.num_workers=1",
            "checkpoint.every=0", "logging.progress_bar=false"]
    assert main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in lines if "reward/mean" in m)
    for key in ("episode/turns_mean", "episode/truncated_fraction", "response/observation_tokens_mean", "loss/policy"):
        assert key in step, key
    assert 1.0 <= step["episode/turns_mean"] <= 3.0


def test_config_checks_of_max_turns(capsys):
    from posttrain.cli import main

    assert main(["grpo", "--print-config", "rollout.max_turns=0"]) == 2
    assert main(["grpo", "--print-config", "rollout.max_turns=2", "model.use_chat_template=false"]) == 2
    assert main(["ppo", "--print-config", "rollout.max_turns=2"]) == 2
    err = capsys.readouterr().err
    assert "rollout.max_turns=0 must be >= 1" in err and "needs model.use_chat_template=true" in err
    assert "grpo command only" in err
