"""The reference engine: batched ``transformers`` generation on the trainer's own modules.

In the trainer it shares the policy's parameters, so ``update_weights`` moves nothing; behind
`posttrain serve` it owns its model and ``update_weights`` copies new weights in place. Rollout
logprobs come from a teacher-forced forward pass of the same weights over the sampled tokens
(``response_logprobs``), which is exactly what the trainer computes: the PPO ratio starts at 1.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from posttrain.models.loading import autocast_context
from posttrain.models.logprobs import make_token_batch, response_logprobs
from posttrain.models.lora import hot_swap_adapter
from posttrain.models.weights import load_named_tensors
from posttrain.sampling import Completion, SamplingParams, eos_token_ids, stop_string_end

SCORE_CHUNK_ROWS = 16


class HFEngine:
    logprobs_match_trainer = True  # they come from the trainer's own forward pass (see _score)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        generation_batch_size: int = 64,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation_batch_size = generation_batch_size
        self.compute_dtype = compute_dtype
        self.eos_token_ids = eos_token_ids(tokenizer, model)
        self.weight_version = 0  # the policy version of the weights; every token of a completion records it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.compute_dtype)()

    def update_weights(self, named_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Copy ``named_tensors`` (Hugging Face names) into the model in place. ``None``: nothing
        to do, because an engine built on the trainer's modules already sees every update."""
        if named_tensors is not None:
            load_named_tensors(self.model, named_tensors)

    def sleep(self) -> None:
        """Nothing to release: generate() allocates its cache per call."""

    def wake(self) -> None:
        """Nothing to re-acquire."""

    def load_lora_adapter(self, adapter_dir: str) -> None:
        """Apply the peft adapter saved in ``adapter_dir`` without a restart (see hot_swap_adapter)."""
        self.model, _ = hot_swap_adapter(self.model, adapter_dir)

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        expanded = [list(p) for p in prompts for _ in range(params.n)]
        was_training = self.model.training
        self.model.eval()
        try:
            completions: list[Completion] = []
            for start in range(0, len(expanded), self.generation_batch_size):
                completions += self._generate_chunk(expanded[start : start + self.generation_batch_size], params)
        finally:
            self.model.train(was_training)
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        pad_id = self.tokenizer.pad_token_id
        # generate() wants prompts left-padded, so that every row's new tokens start together.
        prompt_len = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (prompt_len - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampling = params.temperature > 0
        kwargs = dict(
            do_sample=sampling,
            max_new_tokens=params.max_tokens,
            pad_token_id=pad_id,
            eos_token_id=self.eos_token_ids,
            # Explicit values so the model's generation_config defaults never change sampling.
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=params.top_k if sampling else None,
        )
        if params.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self.tokenizer, params.stop, prompt_len)])
        with self.autocast():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **kwargs,
            )
        generated = output[:, prompt_len:].tolist()
        responses, reasons = zip(*(self._trim(tokens, params) for tokens in generated))
        logprobs = self._score(prompts, list(responses), params) if params.logprobs else [[] for _ in responses]
        return [
            Completion(
                prompt_token_ids=p,
                token_ids=r,
                text=self.tokenizer.decode(r, skip_special_tokens=True),
                logprobs=lp,
                finish_reason=reason,
                token_versions=[self.weight_version] * len(r),
            )
            for p, r, lp, reason in zip(prompts, responses, logprobs, reasons)
        ]

    def _trim(self, tokens: list[int], params: SamplingParams) -> tuple[list[int], str]:
        """Cut one row of ``generate`` output where the sequence really ended.

        Finished rows are filled with pad tokens, which may equal EOS, so the end is the first EOS
        (kept: the model must learn to emit it) or the end of the first stop string."""
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_token_ids), None)
        if params.stop:
            stop_end = stop_string_end(self.tokenizer, tokens[: end or len(tokens)], params.stop)
            if stop_end is not None:
                return tokens[:stop_end], "stop"
        if end is not None:
            return tokens[:end], "stop"
        return tokens, "length"

    def _score(self, prompts: list[list[int]], responses: list[list[int]], params: SamplingParams) -> list[list[float]]:
        temperature = params.temperature if params.temperature > 0 else 1.0
        scored: list[list[float]] = []
        # Small chunks: the (rows, R, vocab) float32 logits are the largest tensor of a rollout.
        for start in range(0, len(prompts), SCORE_CHUNK_ROWS):
            chunk_responses = responses[start : start + SCORE_CHUNK_ROWS]
            batch = make_token_batch(
                prompts[start : start + SCORE_CHUNK_ROWS], chunk_responses, self.tokenizer.pad_token_id, self.device
            )
            with self.autocast():
                logprobs, _ = response_logprobs(self.model, batch, temperature=temperature)
            logprobs = logprobs.float().cpu()
            scored += [logprobs[i, : len(r)].tolist() for i, r in enumerate(chunk_responses)]
        return scored


class _StopStrings(StoppingCriteria):
    """Stop a row once its *generated* text contains a stop string.

    transformers' own ``stop_strings`` also match text that straddles the prompt (a prompt ending
    in "?" plus a generated "?" would match "??"); stop strings are about the completion only, as
    in the OpenAI API. Only a short tail of each row is decoded per step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = prompt_len
        # Every token decodes to at least one character, so this many tokens cover any stop string.
        self.window = max(len(s) for s in self.stops) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_len :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tails)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)
