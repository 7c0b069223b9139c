"""One-pass Triton kernels for the per-chunk work of :mod:`posttrain.models.chunked_logprobs`.

Each chunk's ``(c, V)`` logits are read once for the statistics and once more (and overwritten in
place) for their gradient; that is the least memory traffic the math allows. The compiled
``torch`` functions they replace take several passes (max, logsumexp, entropy) over the logits and
keep a float32 gradient before casting it: 2.25 + 2.86 ms per 4096 tokens at a 152k vocabulary on
an H100 compiled by ``torch.compile``, against 0.47 + 0.89 ms here (docs/benchmarks.md).

Forward, one program per row, with ``z = logits / T`` streamed in blocks and the running maximum
``m`` rescaling the sums as it grows (the online softmax):

    s = sum exp(z - m),   t = sum exp(z - m) (z - m)
    lse = m + log s,      entropy = log s - t / s,      logprob = z[y] - lse

Backward, in place, with ``p = exp(z - lse)`` and incoming per-token gradients ``g`` (logprob)
and ``g_H`` (entropy):

    d/dz = g (onehot(y) - p) - g_H p (log p + entropy),   then divided by T

Only used on a GPU with Triton installed and no LM-head bias; everything else takes the ``torch``
path, which is the reference these kernels are tested against.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("triton") is not None

# Columns per loop iteration, and warps per row: measured on an H100 at V = 151936 (bench/train_check.py).
BLOCK = 4096
NUM_WARPS = 8

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_kernel(logits_ptr, row_stride, targets_ptr, logprob_ptr, lse_ptr, entropy_ptr, n_cols, inv_temp,
                      WITH_ENTROPY: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK_SIZE)
        # -1e30, not -inf: the rescaling term (m_old - m_new) * s stays finite (0 while s is 0).
        m = -1e30
        s = 0.0
        t = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offsets
            mask = cols < n_cols
            # Masked columns read -1e30: exp() makes them 0, and 0 * (their finite centred value) is 0.
            z = tl.load(base + cols, mask=mask, other=-1e30).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            centred = z - m_new
            e = tl.exp(centred)
            if WITH_ENTROPY:
                t = alpha * (t + (m - m_new) * s) + tl.sum(e * centred, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        target = tl.load(targets_ptr + row)
        z_target = tl.load(base + target).to(tl.float32) * inv_temp
        tl.store(logprob_ptr + row, z_target - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, log_s - t / s)

    @triton.jit
    def _grad_kernel(logits_ptr, row_stride, out_ptr, out_row_stride, targets_ptr, lse_ptr, entropy_ptr,
                     grad_logprob_ptr, grad_entropy_ptr, n_cols, inv_temp, WITH_ENTROPY: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        out_base = out_ptr + row * out_row_stride
        offsets = tl.arange(0, BLOCK_SIZE)
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_logprob_ptr + row)
        target = tl.load(targets_ptr + row)
        if WITH_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            g_entropy = tl.load(grad_entropy_ptr + row)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offsets
            mask = cols < n_cols
            log_p = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse
            p = tl.exp(log_p)
            grad = -g * p
            if WITH_ENTROPY:
                grad -= g_entropy * p * (log_p + entropy)
            grad = tl.where(cols == target, grad + g, grad) * inv_temp
            # Each block is read before it is written, so out may be the logits themselves.
            tl.store(out_base + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _check(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a (rows, vocab) tensor with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")


def chunk_stats(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                out: tuple[Tensor, Tensor, Tensor]) -> None:
    """Writes float32 ``(logprobs, lse, entropy)`` of each row of ``logits / temperature`` into
    ``out`` (three contiguous ``(rows,)`` tensors; entropy left untouched unless ``with_entropy``).
    Same values as :func:`posttrain.models.chunked_logprobs.chunk_stats` without a bias."""
    _check(logits)
    logprobs, lse, entropy = out
    _stats_kernel[(logits.shape[0],)](
        logits, logits.stride(0), targets, logprobs, lse, entropy, logits.shape[1], 1.0 / temperature,
        WITH_ENTROPY=with_entropy, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
    )


def chunk_logit_grad_(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, grad_logprobs: Tensor,
                      grad_entropy: Tensor | None, temperature: float, out: Tensor | None = None) -> Tensor:
    """Writes the gradient w.r.t. ``logits`` into ``out`` (in its dtype; default: overwrite
    ``logits``) and returns it. Same values as
    :func:`posttrain.models.chunked_logprobs.chunk_logit_grad` without a bias."""
    _check(logits)
    out = logits if out is None else out
    _check(out)
    with_entropy = grad_entropy is not None
    _grad_kernel[(logits.shape[0],)](
        logits, logits.stride(0), out, out.stride(0), targets, lse, entropy, grad_logprobs.float().contiguous(),
        grad_entropy.float().contiguous() if with_entropy else lse, logits.shape[1], 1.0 / temperature,
        WITH_ENTROPY=with_entropy, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
    )
    return out
