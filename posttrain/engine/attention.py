"""Attention over the paged KV cache.

The cache of one layer is a flat array of slots, ``(num_slots, num_kv_heads, head_dim)``; slot
``block * block_size + offset`` holds one position. Each step first writes the new tokens' keys
and values to their slots, then attends. Two implementations:

* ``attend_gathered`` (any device, any step): gathers each sequence's keys and values from its
  blocks into a padded batch and calls ``scaled_dot_product_attention`` with a causal mask offset
  by the cached length. It is the CPU path, the prefill path on GPU, and the reference the Triton
  kernel is tested against.
* ``paged_decode_attention`` (CUDA, decode steps): a Triton kernel that reads the blocks in
  place, one program per (sequence, KV head) computing all query heads of that group, with an
  online softmax. It needs no host synchronisation, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton is a GPU-only dependency; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch, built once per step by the model runner.

    slot_mapping: (num_tokens,) cache slot of each new token. context_lens: (num_seqs,) positions
    visible to each sequence after this step's writes. block_tables: (num_seqs, max_blocks).
    For prefill also query_lens (num_seqs,) and the padded-layout indices of the new tokens."""

    is_prefill: bool
    slot_mapping: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_context_len: int = 0
    max_query_len: int = 1
    query_lens: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None  # (num_tokens,) sequence index of each new token
    token_cols: torch.Tensor | None = None  # (num_tokens,) its index among its sequence's new tokens
    gather_plan: tuple[torch.Tensor, torch.Tensor] | None = None  # attend_gathered's per-step indices and mask


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """key/value: (num_tokens, num_kv_heads, head_dim) into the caches at ``slots``."""
    k_cache.index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, value.to(v_cache.dtype))


def attend_gathered(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, block_size: int
) -> torch.Tensor:
    """query: (num_tokens, num_heads, head_dim) -> (num_tokens, num_heads, head_dim)."""
    num_seqs = meta.context_lens.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    slots, mask = _gather_plan(meta, block_size)  # the same for every layer of the step
    flat = slots.reshape(-1)
    keys = k_cache.index_select(0, flat).view(num_seqs, -1, *k_cache.shape[1:]).transpose(1, 2)  # (seqs, kv_heads, max_k, head_dim)
    values = v_cache.index_select(0, flat).view(num_seqs, -1, *v_cache.shape[1:]).transpose(1, 2)
    if meta.is_prefill:
        padded = query.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
        padded[meta.token_rows, meta.token_cols] = query
    else:
        padded = query.view(num_seqs, 1, num_heads, head_dim)
    # CPU SDPA with a mask is several times slower in bf16 than in fp32.
    dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2).to(dtype), keys.to(dtype), values.to(dtype), attn_mask=mask,
        scale=scale, enable_gqa=keys.shape[1] != num_heads,
    ).transpose(1, 2).to(query.dtype)  # (seqs, max_q, heads, head_dim)
    if meta.is_prefill:
        return out[meta.token_rows, meta.token_cols]
    return out.reshape(num_seqs, num_heads, head_dim)


def _gather_plan(meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots of each sequence's context, (seqs, max_k), and the attention mask,
    (seqs, 1, max_q, max_k): query i of a sequence sits at position context_len - query_len + i
    and sees the keys up to it. Computed once per step and kept on ``meta``."""
    if meta.gather_plan is not None:
        return meta.gather_plan
    device = meta.context_lens.device
    num_seqs = meta.context_lens.shape[0]
    max_k = max(meta.max_context_len, 1)
    num_blocks = (max_k + block_size - 1) // block_size
    offsets = torch.arange(block_size, device=device)
    slots = (meta.block_tables[:, :num_blocks].unsqueeze(-1) * block_size + offsets).reshape(num_seqs, -1)[:, :max_k]
    max_q = meta.max_query_len if meta.is_prefill else 1
    query_lens = meta.query_lens if meta.is_prefill else torch.ones_like(meta.context_lens)
    query_pos = (meta.context_lens - query_lens).unsqueeze(1) + torch.arange(max_q, device=device)
    key_pos = torch.arange(max_k, device=device).view(1, 1, -1)
    mask = (key_pos <= query_pos.unsqueeze(-1)) & (key_pos < meta.context_lens.view(-1, 1, 1))
    meta.gather_plan = (slots, mask.unsqueeze(1))
    return meta.gather_plan


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale, block_table_stride,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        context_len = tl.load(context_lens_ptr + seq)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        head_ok = g < GROUP
        q = tl.load(q_ptr + seq * NUM_HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], mask=head_ok[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, context_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < context_len
            block = tl.load(block_tables_ptr + seq * block_table_stride + n // BLOCK_SIZE, mask=n_ok, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
            offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
            k = tl.load(k_ptr + offs, mask=n_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offs, mask=n_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        l = tl.where(l == 0.0, 1.0, l)  # padding rows of a CUDA graph have no context
        out = acc / l[:, None]
        tl.store(out_ptr + seq * NUM_HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, block_size: int,
) -> torch.Tensor:
    """One new token per sequence. query: (num_seqs, num_heads, head_dim), same dtype as the cache."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    query = query.contiguous()
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        query, k_cache, v_cache, out, block_tables, context_lens, scale, block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=64, IEEE=query.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"
