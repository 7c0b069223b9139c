"""``model.attn_implementation=sdpa_flex``: FlexAttention for packed rows, sdpa for the rest.

A packed row (several sequences, position ids restarting at each, no attention mask) under sdpa
gets a dense ``(T, T)`` mask: attention across sequences is masked but still computed, T² per row.
FlexAttention's block mask skips those blocks, so attention costs about the sum of each sequence's
own. But flex is a poor fit for generation (a KV cache, padded prompts, one token at a time), which
the ``hf`` engine runs on the same modules. ``sdpa_flex`` registers one attention implementation
with transformers that picks per forward pass:

- the mask: a FlexAttention ``BlockMask`` when the call has no attention mask, no cache offset,
  more than one query, and a mask that is not plain causal (transformers sets
  ``allow_is_causal_skip=False`` when it detected packed sequences), on a CUDA device (flex has no
  CPU backward); otherwise sdpa's mask;
- the kernel: flex for a ``BlockMask``, sdpa for anything else.

Both masks come from the same transformers mask function, so the results are those of either
kernel alone. Importing this module registers the name (posttrain.models does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flex_attention_mask, sdpa_mask

NAME = "sdpa_flex"
FLEX_DEVICE_TYPES = {"cuda"}  # device types whose packed rows use flex (flex's backward is GPU-only)


def packed_rows_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> BlockMask | torch.Tensor | None:
    """A BlockMask for a packed full-sequence pass on a flex device, else sdpa's mask."""
    packed_pass = (
        attention_mask is None and not allow_is_causal_skip and q_length == kv_length > 1
        and q_offset == 0 and kv_offset == 0 and torch.device(device).type in FLEX_DEVICE_TYPES
    )
    if packed_pass:
        return flex_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                                   attention_mask=None, device=device, **kwargs)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)


def packed_rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flex for a BlockMask (a packed pass), sdpa otherwise."""
    if isinstance(attention_mask, BlockMask):
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, packed_rows_attention)
AttentionMaskInterface.register(NAME, packed_rows_mask)
