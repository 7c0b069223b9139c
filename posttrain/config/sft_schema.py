"""Config schema of ``posttrain sft`` (supervised fine-tuning); its checks are in validate/sft.py.

The model, logging and checkpoint sections are GRPO's own (``schema.py``); the optimizer options
keep GRPO's names (``lr``, ``adam_beta1``, ``lr_scheduler``, ...) so ``trainer/optim.py`` builds
AdamW and the schedule for both recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema import CheckpointConfig, LoggingConfig, ModelConfig, opt, section


@dataclass
class SFTDataConfig:
    train_path: str = opt(
        "",
        "Training conversations (required): a JSONL or Parquet file, a `datasets` folder saved with "
        "save_to_disk, or 'hf:NAME' for datasets.load_dataset. Each row holds a chat message list "
        "(`messages_column`) or a prompt and a completion string (`prompt_column`, `completion_column`).",
    )
    validation_path: str = opt(
        "", "Validation conversations, same formats. Empty: carve `validation_size` rows off the training data."
    )
    validation_size: int = opt(
        100, "Rows held out for validation when validation_path is empty (0: no validation). When it is not smaller than the number of rows, a tenth of the rows is held out instead, with a warning."
    )
    split: str = opt("train", "Split to load for 'hf:NAME' datasets and DatasetDict folders.")
    messages_column: str = opt(
        "messages",
        "Column holding a chat list [{role, content}, ...]; the loss covers the assistant turns only "
        "(their content and the end-of-turn token). Wins over prompt/completion when a row has both.",
    )
    prompt_column: str = opt("prompt", "Column holding the prompt text of prompt/completion rows (no loss on it).")
    completion_column: str = opt("completion", "Column holding the target text of prompt/completion rows (the loss covers it).")
    max_seq_len: int = opt(
        2048, "Longest training sequence in tokens (chat template included); longer ones are cut at the end, with a warning."
    )
    packing: bool = opt(
        True,
        "Pack several conversations into each row of a micro-batch, kept apart by restarting "
        "position ids (no attention across conversations; checked on the model at start, falling "
        "back to one padded conversation per row if the model does not honour it). False: one "
        "conversation per row, rows of similar length batched together.",
    )
    shuffle: bool = opt(True, "Shuffle the training conversations each epoch (seeded: the order is reproducible).")


@dataclass
class SFTTrainerConfig:
    max_steps: int = opt(0, "Optimizer steps to train (0: as many as `num_epochs` passes over the data take).")
    num_epochs: float = opt(1.0, "Passes over the training data when max_steps is 0 (fractions allowed, e.g. 0.5).")
    batch_tokens: int = opt(
        16384,
        "Token budget of one optimizer step: whole conversations are taken in data order until the "
        "next one would exceed it, so every step sees about the same number of tokens however long "
        "the conversations are. Must be >= data.max_seq_len.",
    )
    steps_cross_epochs: bool = opt(
        False,
        "Let a step take conversations of the next epoch to fill trainer.batch_tokens. False: the last step "
        "of each epoch takes what the epoch has left (a smaller step), so num_epochs passes show each "
        "conversation num_epochs times, also on a file smaller than one step (then each step is one pass). "
        "True: every step is full; on a file smaller than one step, each step repeats its conversations.",
    )
    micro_batch_tokens: int = opt(
        4096,
        "Token budget of one forward/backward (rows x longest row, padding included); gradients "
        "accumulate to the step's exactly. Bounds activation and logits memory. Must be >= data.max_seq_len.",
    )
    lr: float = opt(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.95, "AdamW beta2 (0.95: steadier than 0.999 on the spiky gradients of LM fine-tuning).")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "Optimizer steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = opt(0.1, "Final lr as a fraction of lr for 'linear' and 'cosine'.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).")
    max_skipped_steps: int = opt(
        5,
        "Stop the run with an error after this many training steps in a row whose optimizer updates were all "
        "skipped for a non-finite (NaN/inf) loss or gradient: such a run learns nothing while reporting "
        "progress. 0: never stop.",
    )
    eval_every: int = opt(
        50, "Compute the validation loss every N steps, before the first and after the last (0: never)."
    )
    output_dir: str = opt(
        "", "Run folder for metrics and checkpoints. Empty: runs/sft-YYYYmmdd-HHMMSS (or the resumed run's folder)."
    )


@dataclass
class SFTConfig:
    seed: int = opt(42, "Seed for data order and initialisation; the same seed reproduces a run.")
    model: ModelConfig = section(ModelConfig, "The model to fine-tune.")
    data: SFTDataConfig = section(SFTDataConfig, "Conversations to imitate.")
    trainer: SFTTrainerConfig = section(SFTTrainerConfig, "Optimisation.")
    logging: LoggingConfig = section(LoggingConfig, "Metrics and console output.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
