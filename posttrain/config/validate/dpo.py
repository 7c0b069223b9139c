"""Cross-field checks of ``posttrain dpo``."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.dpo_schema import DPOConfig
from posttrain.config.validate.common import lora_problems


def dpo_problems(cfg: DPOConfig) -> list[str]:
    """Cross-field checks of a DPO run; one message per problem, each naming its keys."""
    t, a, d = cfg.trainer, cfg.algorithm, cfg.data
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, value in [("trainer.batch_size", t.batch_size), ("trainer.micro_batch_size", t.micro_batch_size),
                       ("data.max_prompt_tokens", d.max_prompt_tokens),
                       ("data.max_response_tokens", d.max_response_tokens)]:
        need(value >= 1, f"{key}={value} must be a positive integer (>= 1).")
    for key, value in [("trainer.max_steps", t.max_steps), ("trainer.warmup_steps", t.warmup_steps),
                       ("trainer.weight_decay", t.weight_decay), ("trainer.max_grad_norm", t.max_grad_norm),
                       ("trainer.eval_every", t.eval_every), ("data.validation_size", d.validation_size),
                       ("checkpoint.every", cfg.checkpoint.every), ("checkpoint.keep_last", cfg.checkpoint.keep_last)]:
        need(value >= 0, f"{key}={value} must be >= 0.")
    need(t.max_steps > 0 or t.num_epochs >= 1,
         f"trainer.num_epochs={t.num_epochs} must be >= 1 when trainer.max_steps=0 (the step count comes from it).")
    if t.batch_size >= 1 and t.micro_batch_size >= 1:
        divisors = [k for k in range(1, t.batch_size + 1) if t.batch_size % k == 0 and k <= t.micro_batch_size]
        need(t.batch_size % t.micro_batch_size == 0,
             f"trainer.micro_batch_size={t.micro_batch_size} must divide trainer.batch_size={t.batch_size} "
             f"(gradients accumulate over whole micro-batches); e.g. trainer.micro_batch_size={max(divisors)}.")
    need(t.lr > 0, f"trainer.lr={t.lr} must be > 0, e.g. trainer.lr=1e-6.")
    need(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1] (a fraction of trainer.lr).")
    need(a.beta > 0, f"algorithm.beta={a.beta} must be > 0 (typical values 0.01-0.5), e.g. algorithm.beta=0.1.")
    need(0 <= a.label_smoothing < 0.5,
         f"algorithm.label_smoothing={a.label_smoothing} must be in [0, 0.5): it is the probability that a label "
         "is flipped, and at 0.5 the labels carry no information.")
    need(a.label_smoothing == 0 or a.loss_type == "sigmoid",
         f"algorithm.label_smoothing={a.label_smoothing} only applies to algorithm.loss_type=sigmoid (conservative "
         f"DPO), not {a.loss_type}; set algorithm.label_smoothing=0.")
    columns = {"data.prompt_column": d.prompt_column, "data.chosen_column": d.chosen_column,
               "data.rejected_column": d.rejected_column}
    need(len(set(columns.values())) == 3,
         "data.prompt_column, data.chosen_column and data.rejected_column must name three different columns, got "
         + ", ".join(f"{k}={v!r}" for k, v in columns.items()) + ".")
    need(bool(d.train_path), "data.train_path is required: set it to a JSONL or Parquet file of preference pairs "
         "(prompt, chosen, rejected), a saved `datasets` folder, or hf:NAME.")
    for key, path in [("data.train_path", d.train_path), ("data.validation_path", d.validation_path)]:
        need(not path or path.startswith("hf:") or Path(path).expanduser().exists(),
             f"{key}='{path}' does not exist (relative paths start at {Path.cwd()}); fix the path "
             "or use hf:NAME for a hub dataset.")
    problems += lora_problems(cfg.model.lora)
    return problems
