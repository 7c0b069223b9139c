"""The engine on the real embedded SmolLM2-135M-Instruct (fp32, CPU) and real GSM8K-style prompts:
greedy tokens identical to transformers, logprobs equal to the trainer's forward pass."""

import pytest
import torch

from posttrain.config.schema import ModelConfig
from posttrain.data.example import PromptExample
from posttrain.engine import Engine
from posttrain.data.chat import encode_prompts
from posttrain.models import load_model_and_tokenizer
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.sampling import SamplingParams

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "What is 17 + 25? Put the final answer in \\boxed{}.",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), torch.device("cpu"))  # the embedded default
    return model.eval(), tokenizer


def test_smollm2_greedy_matches_transformers_on_real_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = [p.token_ids for p in encode_prompts([PromptExample([{"role": "user", "content": q}], {}) for q in QUESTIONS], tokenizer, use_chat_template=True,
                                                   system_prompt="", max_prompt_tokens=512, what="test prompts")]
    engine = Engine(model, tokenizer, max_model_len=256, block_size=16)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=40))
    eos = engine.eos_token_ids
    for prompt, group in zip(prompts, out):
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=40, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
        for completion in group:
            assert completion.token_ids == ref[:end]
    completions = [c for group in out for c in group]
    batch = make_token_batch([c.prompt_token_ids for c in completions], [c.token_ids for c in completions],
                             tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, batch, temperature=1.0)
    for i, c in enumerate(completions):
        torch.testing.assert_close(torch.tensor(c.logprobs), logprobs[i, : len(c.token_ids)], atol=1e-4, rtol=0)
