"""Config schema of ``posttrain dpo`` (Direct Preference Optimization).

Reuses the shared model, logging and checkpoint sections of :mod:`posttrain.config.schema`; the
trainer section keeps GRPO's optimizer and schedule field names so that
:mod:`posttrain.trainer.optim` builds AdamW and the schedule from either.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config.schema import CheckpointConfig, LoggingConfig, ModelConfig, opt, section


@dataclass
class DPODataConfig:
    train_path: str = opt(
        "",
        "Preference pairs: a JSONL or Parquet file, a `datasets` folder saved with save_to_disk, or "
        "'hf:NAME' for datasets.load_dataset. Each row has a prompt, a chosen and a rejected response "
        "(see prompt_column, chosen_column, rejected_column). Required.",
    )
    validation_path: str = opt(
        "", "Validation pairs in the same format. Empty: carve `validation_size` rows off the training data."
    )
    validation_size: int = opt(
        64, "Pairs held out for validation when validation_path is empty (0: no validation). When it is not "
        "smaller than the number of pairs, a tenth of the pairs is held out instead, with a warning."
    )
    split: str = opt("train", "Split to load for 'hf:NAME' datasets and DatasetDict folders.")
    prompt_column: str = opt(
        "prompt",
        "Column holding the prompt: a string (one user message) or a chat list of "
        "{role, content} messages.",
    )
    chosen_column: str = opt(
        "chosen",
        "Column holding the preferred response: a string (the assistant's reply) or a message list "
        "continuing the conversation (a leading copy of the prompt's messages, as in "
        "UltraFeedback-binarized, is removed).",
    )
    rejected_column: str = opt("rejected", "Column holding the dispreferred response, in the same forms as chosen_column.")
    max_prompt_tokens: int = opt(
        512,
        "Prompts longer than this (after the chat template) keep their last tokens, the end of the "
        "conversation that the responses answer; the number truncated is logged.",
    )
    max_response_tokens: int = opt(
        512, "Chosen and rejected responses longer than this keep their first tokens; the number truncated is logged."
    )
    shuffle: bool = opt(True, "Shuffle the training pairs each epoch (seeded: the order is reproducible).")


@dataclass
class DPOAlgorithmConfig:
    beta: float = opt(
        0.1,
        "Strength of the implicit KL constraint to the reference model: the implicit reward is "
        "beta * log(policy / reference). DPO papers use 0.01-0.5; 0.1 is the common default. For "
        "IPO it is the paper's tau (target margin 1/(2 beta)).",
    )
    loss_type: str = opt(
        "sigmoid",
        "'sigmoid': DPO, -log sigmoid(beta * h) on summed response logprobs (Rafailov et al. 2023). "
        "'ipo': (h - 1/(2 beta))^2 on length-averaged logprobs (Azar et al. 2023), which does not "
        "push margins to infinity on deterministic preferences.",
        ("sigmoid", "ipo"),
    )
    label_smoothing: float = opt(
        0.0,
        "Conservative DPO (loss_type sigmoid only): the assumed probability that a pair's label is "
        "flipped, in [0, 0.5). 0 is plain DPO; 0.1 suits noisy preference data.",
    )


@dataclass
class DPOTrainerConfig:
    batch_size: int = opt(32, "Preference pairs per optimizer step.")
    micro_batch_size: int = opt(
        4,
        "Pairs per forward/backward (chosen and rejected go through the model together, so 2x this "
        "many sequences); gradients accumulate to exactly the batch's.",
    )
    max_steps: int = opt(0, "Optimizer steps. 0: as many as num_epochs passes over the training pairs take.")
    num_epochs: int = opt(1, "Passes over the training pairs when max_steps is 0 (DPO overfits quickly: 1-3).")
    steps_cross_epochs: bool = opt(
        False,
        "Let a step take pairs of the next epoch to fill trainer.batch_size. False: the last step of each "
        "epoch takes the pairs the epoch has left (a smaller step), so num_epochs passes show each pair "
        "num_epochs times, also with fewer pairs than batch_size (then each step is one pass). True: every "
        "step has batch_size pairs; with fewer pairs than that, each step repeats them.",
    )
    lr: float = opt(
        1e-6,
        "Peak learning rate of AdamW. DPO needs far smaller steps than SFT because its loss keeps "
        "widening margins once preferences are met; 1e-6 is the DPO paper's value and suits "
        "~100M-1B models (7B recipes use 5e-7; raise to ~5e-6 only if margins barely move).",
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler: str = opt("linear", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    warmup_steps: int = opt(
        10, "Optimizer steps of linear warmup from 0 to lr (the DPO paper warms up over its first updates)."
    )
    min_lr_ratio: float = opt(0.0, "Final lr as a fraction of lr for 'linear' and 'cosine'.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).")
    max_skipped_steps: int = opt(
        5,
        "Stop the run with an error after this many training steps in a row whose optimizer updates were all "
        "skipped for a non-finite (NaN/inf) loss or gradient: such a run learns nothing while reporting "
        "progress. 0: never stop.",
    )
    eval_every: int = opt(
        20, "Compute validation loss, reward accuracy and margins every N steps and at the end (0: only at the end)."
    )
    output_dir: str = opt(
        "", "Run folder for metrics and checkpoints. Empty: runs/dpo-YYYYmmdd-HHMMSS (or the resumed run's folder)."
    )


@dataclass
class DPOConfig:
    seed: int = opt(42, "Seed for data order and initialisation; the same seed reproduces a run.")
    model: ModelConfig = section(
        ModelConfig, "The policy model; its starting weights are also the frozen reference model."
    )
    data: DPODataConfig = section(DPODataConfig, "Preference pairs.")
    algorithm: DPOAlgorithmConfig = section(DPOAlgorithmConfig, "The preference loss.")
    trainer: DPOTrainerConfig = section(DPOTrainerConfig, "Optimisation.")
    logging: LoggingConfig = section(LoggingConfig, "Metrics and console output.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
