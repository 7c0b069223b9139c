"""Attention implementations for packed training rows: ``sdpa_varlen`` (the default) and ``sdpa_flex``.

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
kernel alone.

``sdpa_varlen`` does the same with flash attention's variable-length kernel (the aten op behind
``torch.nn.attention.varlen``): a packed pass gets no mask at all, only the boundaries of its
documents (cumulative lengths, from the position-id restarts), and the kernel attends within each
document: no ``(T, T)`` mask is built and no block outside a document is visited. At 16k tokens of
100-1024-token completions and the Qwen2.5-0.5B heads that is 0.7 ms per layer forward + backward
against 8.5 ms for sdpa over each completion (bench/varlen_probe.py, H200). Used for model types
whose attention is plain causal (:data:`VARLEN_MODEL_TYPES`, no active sliding window) on CUDA;
anything else, generation included, is sdpa. The callers that build packed batches pass the
boundaries as transformers' flash-attention keywords (``cu_seq_lens_q`` ..., see
:func:`varlen_kwargs`); without them they are derived from the position ids.

transformers finds packed documents itself, from the position ids, in every forward pass that has
no attention mask (``masking_utils.find_packed_sequence_indices``), and that check reads a GPU
value: the host waits for all queued work before each micro-batch's forward. Packed batches
therefore compute the same document ids on the host, and while the model runs on one
(:func:`known_documents`) transformers gets those for its position ids without a sync.

Importing this module registers both names and that hook (posttrain.models does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import transformers.masking_utils
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flex_attention_mask, sdpa_mask

NAME = "sdpa_flex"
FLEX_DEVICE_TYPES = {"cuda"}  # device types whose packed rows use flex (flex's backward is GPU-only)
VARLEN_NAME = "sdpa_varlen"
VARLEN_DEVICE_TYPES = {"cuda"}  # flash attention's varlen kernel is CUDA-only
VARLEN_DTYPES = (torch.bfloat16, torch.float16)
# Model types whose attention is causal self-attention and nothing else (a sliding window, when
# the config turns one on, sends a model to sdpa).
VARLEN_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral"}


def _is_packed_pass(attention_mask: Any, allow_is_causal_skip: bool, q_length: int, kv_length: int, q_offset: int,
                    kv_offset: int, device: torch.device | str, device_types: set[str]) -> bool:
    """A full causal pass over packed rows: no padding mask, no cache offset, and a mask that
    transformers could not reduce to plain causal (it detected position-id restarts)."""
    return (attention_mask is None and not allow_is_causal_skip and q_length == kv_length > 1
            and q_offset == 0 and kv_offset == 0 and torch.device(device).type in device_types)


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
    if _is_packed_pass(attention_mask, allow_is_causal_skip, q_length, kv_length, q_offset, kv_offset, device,
                       FLEX_DEVICE_TYPES):
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


class VarlenPass:
    """What ``sdpa_varlen``'s mask function returns for a packed pass instead of a mask: the
    attention function then finds the document boundaries in its keywords or the position ids."""

    def __repr__(self) -> str:
        return "VarlenPass()"


VARLEN_PASS = VarlenPass()


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                allow_is_causal_skip: bool = True, device: torch.device | str = "cpu", **kwargs: Any):
    """No mask for a packed pass on a varlen device (the kernel takes document boundaries); else sdpa's."""
    config = kwargs.get("config")
    if (_is_packed_pass(attention_mask, allow_is_causal_skip, q_length, kv_length, q_offset, kv_offset, device,
                        VARLEN_DEVICE_TYPES) and config is not None and varlen_applies(config)
            and _varlen_dtype(torch.device(device).type, kwargs.get("dtype")) is not None):
        return VARLEN_PASS
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)


def _varlen_dtype(device_type: str, model_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the varlen kernel runs a pass in: the autocast dtype, else the model's, if the
    kernel has it (flash has no float32); None sends the pass to sdpa."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in VARLEN_DTYPES:
        return torch.get_autocast_dtype(device_type)
    return model_dtype if model_dtype in VARLEN_DTYPES else None


def varlen_applies(config: Any) -> bool:
    """Whether a model of this config attends causally within each document and nowhere else."""
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    if getattr(text_config, "model_type", None) not in VARLEN_MODEL_TYPES:
        return False
    window = getattr(text_config, "sliding_window", None)
    return not (window and getattr(text_config, "use_sliding_window", True))


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (documents + 1,), longest document)`` of packed rows, flattened row after
    row: a document starts wherever the position id is 0 (every row starts one)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu_seqlens = torch.cat([starts.new_zeros(1), ends]).to(torch.int32)
    return cu_seqlens, int((ends - starts).max())


_find_packed_sequence_indices = getattr(transformers.masking_utils, "find_packed_sequence_indices", None)
_known_documents: tuple[torch.Tensor, torch.Tensor] | None = None  # (position_ids, their document ids)


def document_ids(position_ids: np.ndarray | torch.Tensor) -> torch.Tensor | None:
    """What transformers' ``find_packed_sequence_indices`` gives for these (host) position ids of
    packed rows: per row, the index of each token's document (a new one wherever the position does
    not go up by 1); None when every row is one document, or the transformers has no such search."""
    if _find_packed_sequence_indices is None:
        return None
    position_ids = np.asarray(position_ids)
    steps = np.diff(position_ids, axis=-1, prepend=position_ids[:, :1] - 1)
    ids = np.cumsum(steps != 1, axis=-1)
    return None if (ids[:, -1] == 0).all() else torch.from_numpy(ids)


def _find_known_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
    if _known_documents is not None and position_ids is _known_documents[0]:
        return _known_documents[1]
    return _find_packed_sequence_indices(position_ids)


@contextlib.contextmanager
def known_documents(position_ids: torch.Tensor, ids: torch.Tensor | None) -> Iterator[None]:
    """While a forward pass runs on ``position_ids`` (the very tensor), transformers takes ``ids``
    (from :func:`document_ids` on the host, moved to their device) as their document ids instead
    of finding them with a device sync. ``ids`` None changes nothing."""
    global _known_documents
    previous = _known_documents
    if ids is not None:
        _known_documents = (position_ids, ids)
    try:
        yield
    finally:
        _known_documents = previous


if _find_packed_sequence_indices is not None:
    transformers.masking_utils.find_packed_sequence_indices = _find_known_packed_sequence_indices


def varlen_kwargs(position_ids: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """transformers' flash-attention keywords for a packed batch, computed on the host from its
    position ids (as :func:`document_boundaries` does on a device), so the forward pass needs no
    device sync to find the documents."""
    position_ids = np.asarray(position_ids)
    starts = np.flatnonzero(position_ids.reshape(-1) == 0)
    ends = np.append(starts[1:], position_ids.size)
    cu_seqlens = torch.from_numpy(np.append(0, ends).astype(np.int32))
    longest = int((ends - starts).max())
    return dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)


def _varlen_kernel():
    """``f(q, k, v, cu_seqlens, max_len, scale) -> out``, all ``(tokens, heads, dim)``, causal within
    each document; grouped-query heads are native to the kernel.

    The aten flash op itself, which has a C++ autograd formula: the public ``varlen_attn`` wraps the
    same op in a Python custom op whose dispatch costs about 0.2 ms of host time per call, forward
    and backward, per layer and micro-batch, and the update is close to host-bound at 0.5B. The
    public function is the fallback for a torch without the aten op."""
    flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if flash is not None:
        def aten(q, k, v, cu_seqlens, max_len, scale):
            return flash(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)[0]

        return aten
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        options["enable_gqa"] = True

    def public(q, k, v, cu_seqlens, max_len, scale):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **options)

    return public


_kernel = None


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Flash varlen for a packed pass, sdpa otherwise. query (B, Hq, T, D), key/value (B, Hkv, T, D)
    -> (B, T, Hq, D), as transformers' attention functions return."""
    global _kernel
    if attention_mask is not VARLEN_PASS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    cu_seqlens, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens, longest = document_boundaries(kwargs["position_ids"])
    if _kernel is None:
        _kernel = _varlen_kernel()
    B, Hq, T, D = query.shape
    # Under autocast the rotary embedding leaves q and k in float32 (sdpa would cast them back).
    dtype = _varlen_dtype(query.device.type, value.dtype) or value.dtype
    q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D).to(dtype) for t in (query, key, value))
    out = _kernel(q, k, v, cu_seqlens.to(query.device, non_blocking=True), int(longest), scaling)
    return out.view(B, T, Hq, D), None


AttentionInterface.register(NAME, packed_rows_attention)
AttentionMaskInterface.register(NAME, packed_rows_mask)
AttentionInterface.register(VARLEN_NAME, varlen_attention)
AttentionMaskInterface.register(VARLEN_NAME, varlen_mask)
