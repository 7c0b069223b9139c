"""Micro-batches of rollout samples for the policy update and the logprob passes.

With ``trainer.micro_batch_tokens > 0`` the samples of a mini-batch are split into micro-batches
by token count, not sample count: as few micro-batches as first-fit decreasing needs to keep each
within the budget, filled as evenly as possible (``balance_documents``), and each micro-batch is
packed into rows of [prompt + response] sequences (``collate(..., packed=True)``): one row with no
padding when the attention kernel skips across documents, else rows no longer than the longest
sample (``packed_row_tokens``).
The document masking comes from position-id restarts (posttrain/data/packing.py explains it and
:func:`~posttrain.data.packing.position_ids_isolate_documents` checks it on the actual model,
once per model). A model whose attention ignores the restarts gets padded rows instead, grouped by
the same budget counting padding (``group_rows``), with a warning.

Losses are normalised by the mini-batch's global token/sequence counts (policy.py), so how the
samples are split and laid out changes no loss or gradient beyond float rounding
(tests/trainer/test_packing_rl.py).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable

import torch

from posttrain.data.packing import balance_documents, group_rows, position_ids_isolate_documents
from posttrain.distributed.balance import same_count_across_ranks
from posttrain.models.packed_attention import FLEX_DEVICE_TYPES, VARLEN_DEVICE_TYPES, VARLEN_NAME, varlen_applies
from posttrain.trainer.samples import Sample, chunks

logger = logging.getLogger("posttrain.trainer")

_isolation_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packs_samples(model: torch.nn.Module, micro_batch_tokens: int,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> bool:
    """Whether micro-batches for ``model`` are packed rows: ``micro_batch_tokens > 0`` and the model
    keeps packed documents apart by position ids alone (checked once per model, warned if not)."""
    if micro_batch_tokens <= 0:
        return False
    if model not in _isolation_checked:
        isolates = position_ids_isolate_documents(model, autocast)
        if not isolates:
            logger.warning("This model's attention ignores position-id document boundaries; trainer.micro_batch_tokens "
                           "uses padded rows instead of packed ones (trainer.micro_batch_tokens=0 silences this).")
        _isolation_checked[model] = isolates
    return _isolation_checked[model]


# Attention implementations that skip (not just mask) attention between packed documents.
SPARSE_PACKED_ATTENTION = {"sdpa_flex", "flex_attention", "flash_attention_2", "flash_attention_3", VARLEN_NAME}


def skips_across_documents(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention skips, not just masks, attention between packed documents on
    its device (sdpa_flex and sdpa_varlen are sdpa, a dense mask, off their GPU paths)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SPARSE_PACKED_ATTENTION:
        return False
    parameter = next(model.parameters(), None)
    device_type = parameter.device.type if parameter is not None else "cpu"
    if implementation == "sdpa_flex":
        return device_type in FLEX_DEVICE_TYPES
    if implementation == VARLEN_NAME:
        return device_type in VARLEN_DEVICE_TYPES and varlen_applies(config)
    return True


def packed_row_tokens(model: torch.nn.Module, configured: int, samples: list[Sample]) -> int:
    """Longest row when packing ``samples`` into one micro-batch (0: a single row). ``configured`` > 0
    is used as is. 0 picks by the attention kernel: one row when it skips across documents, else rows
    no longer than the longest sample: a dense kernel (sdpa, eager) computes attention over a whole
    row, and rows that long cost no more attention than one padded row per sample would."""
    if configured > 0:
        return configured
    if skips_across_documents(model):
        return 0
    return max(s.num_tokens for s in samples)


def split_micro_batches(samples: list[Sample], micro_batch_size: int, micro_batch_tokens: int,
                        packed: bool) -> list[list[Sample]]:
    """The micro-batches of ``samples``: ``micro_batch_size`` samples each when ``micro_batch_tokens``
    is 0; else token-budget groups, balanced packed rows (``packed``) or padded rows of similar length
    whose rows x longest stay within the budget. A sample longer than the budget is a micro-batch of
    its own. Under FSDP every rank gets as many micro-batches as the rank with the most (their forward
    and backward passes are collectives)."""
    if micro_batch_tokens <= 0:
        return same_count_across_ranks(chunks(samples, micro_batch_size), lambda s: s.num_tokens)
    lengths = [s.num_tokens for s in samples]
    groups = balance_documents(lengths, micro_batch_tokens) if packed else group_rows(lengths, micro_batch_tokens)
    return same_count_across_ranks([[samples[i] for i in group] for group in groups], lambda s: s.num_tokens)
