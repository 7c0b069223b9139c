"""What ``--dry-run`` estimates from: the model's shape (built on the meta device, no weights) and
the plan of one training step (sequences, tokens, passes) read off the run's own data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.algorithms import resolved_off_policy_correction
from posttrain.config.schema import ModelConfig
from posttrain.data.chat import encode_prompts
from posttrain.data.packing import TokenBudgetBatcher
from posttrain.data.preference import load_preference_examples, tokenize_pairs
from posttrain.data.prompts import load_prompt_data
from posttrain.data.sampler import EpochSampler
from posttrain.data.sft import load_sft_conversations, tokenize_conversations
from posttrain.envs.registry import check_task_data, env_specs, resolve_env_classes
from posttrain.models.loading import load_tokenizer, model_source
from posttrain.models.lora import apply_lora
from posttrain.models.moe import build_random_moe_model
from posttrain.models.value_model import ValueModel

PROMPT_SAMPLE = 256  # rows tokenized to measure the data's lengths


@dataclass
class ModelShape:
    """What the estimates need from a model: parameter counts and the transformer's sizes."""

    total: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token in a cache of 1-byte elements (multiply by the dtype's size)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    def activation_values_per_token(self, checkpointing: bool) -> int:
        """Values kept for the backward pass per token: about 8 x hidden + 4 x kv + 4 x intermediate
        per layer (norm inputs and outputs, q/k/v, attention output, the MLP's gate/up/product);
        with activation checkpointing, each layer's input plus one layer recomputed at a time."""
        per_layer = 8 * self.hidden + 4 * self.kv_heads * self.head_dim + 4 * self.intermediate
        return self.layers * self.hidden + per_layer if checkpointing else self.layers * per_layer


def meta_model_shape(model_cfg: ModelConfig, critic: bool = False, moe: Any = None) -> ModelShape:
    """Build the model on the ``meta`` device from its config (no weights are read) and measure it.
    ``critic``: the PPO value model instead (the transformer without its LM head, plus a value head).
    ``moe`` with ``random_init.family`` set: the random-init MoE policy the run builds (model.path
    then only lends its tokenizer), as ``load_model_and_tokenizer`` does."""
    if moe is not None and moe.random_init.family and not critic:
        with torch.device("meta"):
            model = build_random_moe_model(moe, load_tokenizer(model_source(model_cfg), model_cfg),
                                           model_cfg.attn_implementation)
        config = model.config
    else:
        config = AutoConfig.from_pretrained(model_source(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    if critic:
        model = ValueModel(model.base_model)
    elif model_cfg.lora.r > 0:
        model = apply_lora(model, model_cfg.lora)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        # An MoE layer runs top-k experts per token: its MLP activations are k experts' worth.
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size) * (
            getattr(text, "num_experts_per_tok", None) or 1),
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", 0) or 0,
    )


@dataclass
class StepPlan:
    """One step's work in tokens, for the estimates. Lengths are means over a sample of the data."""

    sequence_tokens: float  # one training sequence (prompt + response)
    trained_tokens: float  # forward+backward through the policy per step
    forward_tokens: float  # forward-only policy/reference passes per step
    micro_batch_tokens: int
    forward_what: str = ""  # which passes those are
    completions: int = 0  # generated per step (grpo/ppo)
    max_new_tokens: int = 0
    critic_tokens: float = 0.0  # ppo: forward + forward+backward of the critic per step
    once_forward_tokens: float = 0.0  # dpo: the reference pass over every pair, once
    validation: str = ""  # what one validation does
    validation_forward_tokens: float = 0.0  # sft/dpo: forward tokens of one validation
    validation_generated: int = 0  # grpo/ppo: greedy completions of one validation
    validation_max_tokens: int = 0
    num_validations: int = 0
    steps: int = 0
    sequences: list = dataclasses.field(default_factory=list)  # token ids of the data, for the timed pass
    prompts: list = dataclasses.field(default_factory=list)  # grpo/ppo: prompt token ids, for the timed generation


def rl_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    r, a, t, v = cfg.rollout, cfg.algorithm, cfg.trainer, cfg.validation
    # The trainers' first checks: an environment that does not import, or rows it cannot score, fail here too.
    env_classes = resolve_env_classes(env_specs(cfg.env.cls, cfg.env.kwargs, cfg.env.tasks))
    train, val = load_prompt_data(cfg.data, cfg.seed)
    check_task_data(env_classes, train, "training prompts")
    check_task_data(env_classes, val, "validation prompts")
    encode = dict(use_chat_template=cfg.model.use_chat_template, system_prompt=cfg.model.system_prompt,
                  max_prompt_tokens=cfg.data.max_prompt_tokens)
    prompts = encode_prompts(train[:PROMPT_SAMPLE], tokenizer, **encode, what="training prompts")
    seq = sum(len(p.token_ids) for p in prompts) / len(prompts) + r.max_new_tokens
    per_step = r.batch_size * seq
    # Old logprobs are recomputed unless the engine's match the trainer's (the hf backend scores with it).
    recompute = resolved_off_policy_correction(a).name != "none" or (r.recompute_logprobs and r.backend != "hf")
    passes = ["reference logprobs"] * (a.kl_coef > 0) + ["old logprobs recomputed"] * recompute
    num_val = min(len(val), v.max_prompts) if v.max_prompts else len(val)
    # As the recipes do: before step 1, every `every` steps but the last, after the last.
    validations = v.at_start + (t.max_steps - 1) // v.every * (v.every > 0) + v.at_end if num_val else 0
    val_tokens = v.max_new_tokens or r.max_new_tokens
    return StepPlan(
        sequence_tokens=seq, trained_tokens=per_step * a.ppo_epochs,
        forward_tokens=per_step * len(passes), forward_what=", ".join(passes),
        micro_batch_tokens=t.micro_batch_tokens or int(t.micro_batch_size * (cfg.data.max_prompt_tokens + r.max_new_tokens)),
        completions=r.batch_size, max_new_tokens=r.max_new_tokens,
        critic_tokens=per_step * (1 + a.ppo_epochs) if hasattr(cfg, "critic") else 0.0,
        validation=f"{num_val} greedy prompts x up to {val_tokens} tokens" if validations else "",
        validation_generated=num_val, validation_max_tokens=val_tokens, num_validations=validations, steps=t.max_steps,
        sequences=[p.token_ids for p in prompts], prompts=[p.token_ids for p in prompts],
    )


def sft_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    t = cfg.trainer
    train, val = load_sft_conversations(cfg.data, cfg.seed)
    examples = tokenize_conversations(train[:PROMPT_SAMPLE], tokenizer, cfg.model, cfg.data.max_seq_len)
    mean = sum(len(ex) for ex in examples) / max(len(examples), 1)
    steps = t.max_steps or sft_steps(cfg, [len(ex) for ex in examples], len(train))
    evaluate = t.eval_every > 0 and bool(val)
    # A step repeats conversations only with trainer.steps_cross_epochs (else it ends with its epoch).
    data_tokens = len(train) * mean
    trained = t.batch_tokens if t.steps_cross_epochs else min(t.batch_tokens, data_tokens)
    return StepPlan(sequence_tokens=mean, trained_tokens=trained, forward_tokens=0.0,
                    micro_batch_tokens=t.micro_batch_tokens, steps=steps,
                    validation=f"loss on {len(val)} conversations" if evaluate else "",
                    num_validations=2 + (steps - 1) // t.eval_every if evaluate else 0,
                    validation_forward_tokens=len(val) * mean if evaluate else 0.0,
                    sequences=[ex.input_ids for ex in examples])


def sft_steps(cfg: Any, lengths: list[int], num_rows: int) -> int:
    """The steps of trainer.num_epochs, as the SFT recipe counts them: exactly (its batcher) when
    every row was tokenized, else from the mean length of the rows that were."""
    t = cfg.trainer
    if len(lengths) == num_rows:
        return TokenBudgetBatcher(lengths, t.batch_tokens, cfg.seed, cfg.data.shuffle,
                                  epoch_bounded=not t.steps_cross_epochs).steps_for_epochs(t.num_epochs)
    epoch_tokens = num_rows * sum(lengths) / max(len(lengths), 1)
    if t.steps_cross_epochs:
        return max(1, math.ceil(epoch_tokens * t.num_epochs / t.batch_tokens))
    per_epoch = epoch_tokens / t.batch_tokens
    whole, fraction = divmod(t.num_epochs, 1)
    return max(1, int(whole) * math.ceil(per_epoch) + math.ceil(fraction * per_epoch))


def dpo_plan(cfg: Any, tokenizer: Any) -> StepPlan:
    d, t = cfg.data, cfg.trainer
    train, val = load_preference_examples(d, cfg.seed)
    pairs = tokenize_pairs(train[:PROMPT_SAMPLE], tokenizer, use_chat_template=cfg.model.use_chat_template,
                           system_prompt=cfg.model.system_prompt, max_prompt_tokens=d.max_prompt_tokens,
                           max_response_tokens=d.max_response_tokens, what="training pairs")
    # Chosen and rejected each go through the model with the prompt: two sequences per pair.
    sequences = [s for p in pairs for s in (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)]
    per_pair = sum(len(s) for s in sequences) / max(len(pairs), 1)
    # Steps and pairs per step as the DPO recipe's sampler hands them out.
    sampler = EpochSampler(len(train), t.batch_size, cfg.seed, d.shuffle, epoch_bounded=not t.steps_cross_epochs)
    steps = t.max_steps or sampler.steps_for_epochs(t.num_epochs)
    pairs_per_step = t.batch_size if t.steps_cross_epochs else min(t.batch_size, len(train))
    return StepPlan(sequence_tokens=per_pair / 2, trained_tokens=pairs_per_step * per_pair, forward_tokens=0.0,
                    micro_batch_tokens=int(t.micro_batch_size * per_pair), steps=steps,
                    once_forward_tokens=(len(train) + len(val)) * per_pair,
                    validation=f"loss and margins on {len(val)} pairs" if val else "",
                    num_validations=(1 + (steps - 1) // t.eval_every if t.eval_every else 1) if val else 0,
                    validation_forward_tokens=len(val) * per_pair, sequences=sequences)
