"""Cross-field checks of ``posttrain sft``."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.sft_schema import SFTConfig
from posttrain.config.validate.common import lora_problems


def sft_problems(cfg: SFTConfig) -> list[str]:
    """Cross-field checks of an SFT run; one message per problem, each naming its keys."""
    d, t, c = cfg.data, cfg.trainer, cfg.checkpoint
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(d.train_path), "data.train_path is required: set it to a JSONL or Parquet file, a saved "
         "`datasets` folder, or hf:NAME, e.g. data.train_path=chats.jsonl.")
    for key, path in [("data.train_path", d.train_path), ("data.validation_path", d.validation_path)]:
        need(not path or path.startswith("hf:") or Path(path).expanduser().exists(),
             f"{key}='{path}' does not exist (relative paths start at {Path.cwd()}); fix the path "
             "or use hf:NAME for a hub dataset.")
    for key, value in [("data.messages_column", d.messages_column), ("data.prompt_column", d.prompt_column),
                       ("data.completion_column", d.completion_column)]:
        need(bool(value), f"{key} must name a column, not be empty.")
    need(d.max_seq_len >= 2, f"data.max_seq_len={d.max_seq_len} must be >= 2: a token is only learned "
         "from the tokens before it.")
    for key, value in [("trainer.batch_tokens", t.batch_tokens), ("trainer.micro_batch_tokens", t.micro_batch_tokens)]:
        need(value >= 1, f"{key}={value} must be a positive integer (>= 1).")
        if value >= 1 and d.max_seq_len >= 2:
            need(value >= d.max_seq_len, f"{key}={value} must be >= data.max_seq_len={d.max_seq_len}, so the "
                 f"longest conversation fits; raise it or lower data.max_seq_len.")
    need(t.max_steps >= 0, f"trainer.max_steps={t.max_steps} must be >= 0 (0: derive it from trainer.num_epochs).")
    need(t.max_steps > 0 or t.num_epochs > 0, f"trainer.num_epochs={t.num_epochs} must be > 0 when "
         "trainer.max_steps=0; set one of them.")
    need(t.lr > 0, f"trainer.lr={t.lr} must be > 0, e.g. trainer.lr=2e-5.")
    need(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1] (a fraction of trainer.lr).")
    for key, value in [("trainer.adam_beta1", t.adam_beta1), ("trainer.adam_beta2", t.adam_beta2)]:
        need(0 <= value < 1, f"{key}={value} must be in [0, 1).")
    need(t.adam_eps > 0, f"trainer.adam_eps={t.adam_eps} must be > 0.")
    for key, value in [("trainer.warmup_steps", t.warmup_steps), ("trainer.weight_decay", t.weight_decay),
                       ("trainer.max_grad_norm", t.max_grad_norm), ("trainer.eval_every", t.eval_every),
                       ("checkpoint.every", c.every), ("checkpoint.keep_last", c.keep_last),
                       ("data.validation_size", d.validation_size)]:
        need(value >= 0, f"{key}={value} must be >= 0.")
    problems += lora_problems(cfg.model.lora)
    return problems
