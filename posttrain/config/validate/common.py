"""Checks every schema shares: allowed choices, finite floats, the run folder, the device, the
skipped-step limit and a LoRA section. Each returns one message per problem, naming its key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

from posttrain.config.fields import field_choices, format_value


def choice_problems(cfg: Any, prefix: str) -> list[str]:
    problems: list[str] = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        choices = field_choices(f)
        if dataclasses.is_dataclass(value):
            problems += choice_problems(value, key + ".")
        elif choices is not None and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}={format_value(value)} is not allowed; choose one of: "
                            f"{', '.join(str(c) for c in choices)}.{hint}")
    return problems


def nonfinite_problems(cfg: Any, prefix: str) -> list[str]:
    """Every float option must be a finite number: inf or nan passes most range checks (inf > 0)
    and then poisons training silently (trainer.lr=inf makes every update NaN)."""
    problems: list[str] = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += nonfinite_problems(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}={value} must be a finite number (not inf or nan).")
    return problems


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def output_dir_problems(output_dir: str, key: str = "trainer.output_dir") -> list[str]:
    """A run folder that cannot be created: an existing file (or /dev/null), or a path below a file."""
    if not output_dir:
        return []
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        return [f"{key}='{output_dir}' is a file, not a folder; the run writes config.yaml, metrics.jsonl and "
                "checkpoints/ into it. Choose a folder path (new or existing)."]
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"{key}='{output_dir}' cannot be created: '{parent}' is a file, not a folder."]
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return [f"{key}='{output_dir}' cannot be created: the folder '{parent}' is not writable."]
    return []


def common_problems(cfg: Any) -> list[str]:
    """Checks every trainer's config shares: the run folder, the device, the skipped-step limit."""
    problems: list[str] = []
    trainer, model = getattr(cfg, "trainer", None), getattr(cfg, "model", None)
    if trainer is not None and isinstance(getattr(trainer, "output_dir", None), str):
        problems += output_dir_problems(trainer.output_dir)
    if trainer is not None and getattr(trainer, "max_skipped_steps", 0) < 0:
        problems.append(f"trainer.max_skipped_steps={trainer.max_skipped_steps} must be >= 0 (0: never stop).")
    if trainer is not None and getattr(trainer, "master_weights", False) and getattr(trainer, "param_dtype", "") != "bfloat16":
        problems.append(f"trainer.master_weights=true keeps float32 masters of bf16 parameters, but trainer.param_dtype="
                        f"{trainer.param_dtype} parameters are already the master weights; set trainer.param_dtype=bfloat16 "
                        "(bf16 weights, float32 masters in the optimizer) or trainer.master_weights=false.")
    chunk = getattr(model, "chunked_logprobs", 0)
    if not (chunk == "auto" or (isinstance(chunk, int) and chunk >= 0)):
        problems.append(f"model.chunked_logprobs={chunk!r} is not a chunk size; use auto (sized from the vocabulary "
                        "and GPU memory), a number of tokens such as 4096, or 0 (no chunking).")
    device = getattr(model, "device", None)
    if isinstance(device, str) and not DEVICE_RE.match(device):
        problems.append(f"model.device='{device}' is not a device posttrain trains on; use auto (cuda if "
                        "available), cpu, cuda or cuda:N.")
    return problems


def lora_problems(lora: Any, prefix: str = "model.lora") -> list[str]:
    """Checks of a LoRA section (``model.lora`` of every schema with a model), one line per problem."""
    problems: list[str] = []
    if lora.r < 0:
        problems.append(f"{prefix}.r={lora.r} must be >= 0 (0: no LoRA, full fine-tuning; typical ranks 8-64).")
    if not lora.alpha > 0:
        problems.append(f"{prefix}.alpha={lora.alpha} must be > 0 (adapter updates are scaled by alpha / r; "
                        "typical: 2 x r).")
    if not 0 <= lora.dropout < 1:
        problems.append(f"{prefix}.dropout={lora.dropout} must be in [0, 1).")
    if lora.r > 0 and (not lora.target_modules or not all(isinstance(t, str) and t for t in lora.target_modules)):
        problems.append(f"{prefix}.target_modules={list(lora.target_modules)} must be a non-empty list of module "
                        "names, e.g. [q_proj,v_proj], or [all-linear].")
    return problems
