"""Prompt data: file and hub loaders, the GSM8K adapter, the embedded arithmetic task and the
seeded epoch sampler. The trainer calls ``load_prompt_data`` and ``EpochSampler``."""

from posttrain.data.arithmetic import generate_arithmetic_problems, make_arithmetic_splits
from posttrain.data.example import DEFAULT_MATH_INSTRUCTION, PromptExample
from posttrain.data.gsm8k import extract_gsm8k_answer, load_gsm8k
from posttrain.data.files import read_jsonl, read_rows
from posttrain.data.prompts import (
    append_instruction,
    load_prompt_data,
    rows_to_examples,
    split_validation,
)
from posttrain.data.sampler import EpochSampler

__all__ = [
    "DEFAULT_MATH_INSTRUCTION",
    "EpochSampler",
    "PromptExample",
    "append_instruction",
    "extract_gsm8k_answer",
    "generate_arithmetic_problems",
    "load_gsm8k",
    "load_prompt_data",
    "make_arithmetic_splits",
    "read_jsonl",
    "read_rows",
    "rows_to_examples",
    "split_validation",
]
