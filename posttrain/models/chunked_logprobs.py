"""Token logprobs and entropy from hidden states without a full ``(tokens, vocab)`` float32 tensor.

The plain path (``response_logprobs`` with ``chunk_size=0``) runs the LM head over every kept
position and keeps the ``(N, V)`` logits (and their float32 copy) alive for the backward pass:
with a 150k vocabulary that is 600 kB per token. :class:`ChunkedLogprobs` instead takes the final
hidden states ``h`` (N, H) and the head weight ``W`` (V, H), computes the logits ``chunk_size``
tokens at a time, keeps only per-token scalars (logprob, logsumexp, entropy), and recomputes each
chunk's logits in the backward pass. At most one chunk's ``(chunk, V)`` logits exist at a time.

With ``z = (h W^T + b) / T``, ``p = softmax(z)``, ``lp = z[y] - lse(z)`` and
``H = -sum(p log p)``:

    d lp / d z = onehot(y) - p
    d H  / d z = -p * (log p + H)

and ``d / d(h W^T + b) = (d / d z) / T``.

The matmul runs in the dtype of ``h`` and ``W`` (the caller casts both to the autocast dtype, as
autocast would for the LM head on the plain path, so the two paths agree); with ``float32_logits``
its output stays float32 instead of being rounded to that dtype, and the logits' gradient is
written to a 16-bit buffer for the two backward matmuls. The softmax, logsumexp, entropy and their
gradients are float32. Gradients w.r.t. ``W`` and the bias are accumulated in
float32 across chunks.

The matmuls run in cuBLAS. The element-wise work on each chunk's logits (:func:`chunk_stats`,
:func:`chunk_logit_grad`: about ten memory-bound passes over ``(chunk, V)`` float32 when run
eagerly, a large share of the update's time at a 150k vocabulary) runs on a GPU in the one-pass
Triton kernels of :mod:`posttrain.models.logit_kernels` (without an LM-head bias), else compiled
with ``torch.compile``, else eagerly; a kernel or compiler failure logs a warning and falls back
to the next of these, so training never stops for it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

import posttrain.models.logit_kernels as logit_kernels

logger = logging.getLogger("posttrain.models")


def chunk_stats(logits: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's ``(c, V)`` matmul output -> float32 ``(logprobs, lse, entropy)``, each ``(c,)``
    (entropy zeros unless ``with_entropy``). Element-wise work only, so that compiled it is one
    or two fused passes over the logits instead of ~10."""
    z = logits if bias is None else logits + bias
    z = z.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if with_entropy:
        # H = lse - E_p[z], on max-centred logits (no cancellation for large logits).
        centred = z - z.amax(dim=-1, keepdim=True)
        centred_lse = torch.logsumexp(centred, dim=-1, keepdim=True)
        probs = torch.exp(centred - centred_lse)
        entropy = centred_lse.squeeze(-1) - (probs * centred).sum(dim=-1)
    else:
        entropy = torch.zeros_like(lse)
    return logprobs, lse, entropy


def chunk_logit_grad(logits: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, entropy: Tensor,
                     grad_logprobs: Tensor, grad_entropy: Tensor | None, temperature: float,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The gradient w.r.t. a chunk's matmul output ``(c, V)`` (in ``out_dtype``) and, with a bias,
    its float32 sum over tokens ``(V,)`` (the bias gradient; else None), from the incoming
    per-token gradients."""
    z = logits if bias is None else logits + bias
    z = z.float()
    if temperature != 1.0:
        z = z / temperature
    log_probs = z - lse.unsqueeze(-1)
    probs = torch.exp(log_probs)
    # d lp / d z = onehot - p, times the incoming gradient.
    grad = probs * -grad_logprobs.unsqueeze(-1)
    grad = grad.scatter_add(-1, targets.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
    if grad_entropy is not None:
        # d H / d z = -p (log p + H).
        grad = grad - probs * (log_probs + entropy.unsqueeze(-1)) * grad_entropy.unsqueeze(-1)
    if temperature != 1.0:
        grad = grad / temperature
    return grad.to(out_dtype), (grad.sum(dim=0) if bias is not None else None)


# On these device types the per-chunk element-wise functions run compiled (fused); elsewhere eager.
COMPILE_DEVICE_TYPES = {"cuda"}
_compiled: dict = {}


def _chunk_fn(fn, device: torch.device):
    """``fn`` compiled on COMPILE_DEVICE_TYPES, eager elsewhere or once compiling has failed."""
    if device.type not in COMPILE_DEVICE_TYPES or _compiled.get(fn) is False:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=None)  # the last, shorter chunk makes the length dynamic

    def run(*args):
        try:
            return _compiled[fn](*args)
        except Exception as exc:  # a compiler problem must not stop training: same math, eager
            logger.warning("model.chunked_logprobs: compiling %s failed (%s: %s); running it eagerly.",
                           fn.__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _compiled[fn] = False
            return fn(*args)

    return run


_KERNELS_OK = {"cuda": logit_kernels.AVAILABLE}  # device types that run logit_kernels (until one fails)


def _run_kernel(device: torch.device, bias: Tensor | None, kernel, logits: Tensor, *args) -> bool:
    """Runs ``kernel(logits, *args)`` where the Triton kernels apply (a GPU, no bias) and returns
    True; False when they do not apply or failed to compile, and the caller takes the torch path
    for this chunk (a failure to compile happens before the kernel has written anything)."""
    if bias is not None or not _KERNELS_OK.get(device.type):
        return False
    try:
        kernel(logits, *args)
        return True
    except Exception as exc:  # a Triton/driver problem must not stop training: same math in torch
        logger.warning("model.chunked_logprobs: the Triton kernel %s failed (%s: %s); using torch from now on.",
                       kernel.__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        _KERNELS_OK[device.type] = False
        return False


_FLOAT32_OUT_MATMUL = {"cuda": True}  # device types whose 16-bit matmuls can write float32 (until one fails)


def _accumulate_float32(total: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``total + a @ b`` with ``total`` float32 and ``a``, ``b`` possibly 16-bit. On a GPU the
    matmul accumulates straight into float32 (``addmm(..., out_dtype=float32)``): no rounding of
    each chunk's product to 16 bits, and no separate cast and add passes over the (V, H) gradient."""
    device_type = a.device.type
    if a.dtype != torch.float32 and _FLOAT32_OUT_MATMUL.get(device_type):
        try:
            return torch.addmm(total, a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without the float32-output matmul
            _FLOAT32_OUT_MATMUL[device_type] = False
    return total.add_((a @ b).float())


def matmul_float32_out(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as float32, with 16-bit ``a`` and ``b`` multiplied as they are (the products and
    their sum are float32 either way; only the output is not rounded back to 16 bits). On a GPU
    this is the same cuBLAS matmul with a float32 output; elsewhere the operands are upcast."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    device_type = a.device.type
    if _FLOAT32_OUT_MATMUL.get(device_type):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _FLOAT32_OUT_MATMUL[device_type] = False
    return a.float() @ b.float()


class ChunkedLogprobs(torch.autograd.Function):
    """``apply(h, weight, bias, targets, temperature, chunk_size, with_entropy, float32_logits)`` ->
    ``(logprobs (N,), entropy (N,))`` float32; entropy is zeros when ``with_entropy`` is False."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk_size, with_entropy, float32_logits):
        n = h.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.zeros_like(logprobs)
        stats = _chunk_fn(chunk_stats, h.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                logits = _chunk_logits(h[start:end], weight, float32_logits)
                out = logprobs[start:end], lse[start:end], entropy[start:end]
                if not _run_kernel(h.device, bias, logit_kernels.chunk_stats, logits, targets[start:end],
                                   temperature, with_entropy, out):
                    out[0][:], out[1][:], out[2][:] = stats(logits, bias, targets[start:end], temperature, with_entropy)
                del logits
        ctx.save_for_backward(h, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.float32_logits = float32_logits
        ctx.set_materialize_grads(False)  # an unused (e.g. detached) entropy gets None, not zeros
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        h, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        use_entropy = ctx.with_entropy and grad_entropy is not None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        logit_grad = _chunk_fn(chunk_logit_grad, h.device)
        n = h.shape[0]
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h_chunk = h[start:end]
                logits, grad_sum = _chunk_logits(h_chunk, weight, ctx.float32_logits), None
                chunk_args = (targets[start:end], lse[start:end], entropy[start:end], grad_logprobs[start:end],
                              grad_entropy[start:end] if use_entropy else None, temperature)
                # The gradient goes into the logits' memory, or, when those are float32 for 16-bit
                # weights, into a 16-bit buffer for the matmuls below.
                grad = logits if logits.dtype == h.dtype else torch.empty_like(logits, dtype=h.dtype)
                if not _run_kernel(h.device, bias, logit_kernels.chunk_logit_grad_, logits, *chunk_args, grad):
                    grad, grad_sum = logit_grad(logits, bias, *chunk_args[:-1], temperature, h.dtype)
                del logits
                if need_b:
                    grad_b += grad_sum
                if need_h:
                    grad_h[start:end] = grad @ weight
                if need_w:
                    grad_w = _accumulate_float32(grad_w, grad.t(), h_chunk)
                del grad
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


AUTO_CHUNK = "auto"
CPU_CHUNK = 4096  # the CPU's chunk: larger ones are not faster there, and tests' metrics depend on it
MIN_AUTO_CHUNK, MAX_AUTO_CHUNK = 1024, 8192  # 8192: the largest measured (3 MFU points over 4096 at 0.5B)
_auto_chunks: dict[tuple[str, int, int], int] = {}


def auto_chunk_size(vocab_size: int, logit_bytes: int, total_bytes: float, free_bytes: float) -> int:
    """``"auto"``'s chunk on a GPU with this much memory (see :func:`resolve_chunk_size`)."""
    budget = min(total_bytes / 16, free_bytes / 4)
    chunk = MAX_AUTO_CHUNK
    while chunk > MIN_AUTO_CHUNK and chunk * vocab_size * logit_bytes > budget:
        chunk //= 2
    return chunk


def resolve_chunk_size(setting: int | str, vocab_size: int, device: torch.device, logit_bytes: int) -> int:
    """The chunk size ``model.chunked_logprobs`` means: an int as given (0: off), or for ``"auto"`` on
    a GPU the largest power of two in [1024, 8192] whose ``(chunk, vocab)`` logits take at most 1/16
    of the device's memory and 1/4 of what is free (their gradient takes as much again in the
    backward pass); 4096 on CPU. Decided once per device, vocabulary and logit width, so a run's
    chunking does not change from step to step as free memory does.

    On an 80 GB H100 a 152k vocabulary with float32 logits gets 8192 (5.0 GB of logits), a 49k one
    8192, a 24 GB card with a 152k vocabulary 2048."""
    if setting != AUTO_CHUNK:
        return int(setting)
    if device.type != "cuda":
        return CPU_CHUNK
    key = (str(device), vocab_size, logit_bytes)
    if key not in _auto_chunks:
        free, total = torch.cuda.mem_get_info(device)
        _auto_chunks[key] = chunk = auto_chunk_size(vocab_size, logit_bytes, total, free)
        logger.info("model.chunked_logprobs=auto: %d tokens per chunk (vocabulary %d, %d-byte logits, %.1f of "
                    "%.1f GiB free)", chunk, vocab_size, logit_bytes, free / 2**30, total / 2**30)
    return _auto_chunks[key]


def _chunk_logits(h_chunk: Tensor, weight: Tensor, float32_logits: bool) -> Tensor:
    return matmul_float32_out(h_chunk, weight.t()) if float32_logits else h_chunk @ weight.t()


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    float32_logits: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logprobs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``(N, H)`` final hidden states of the positions that predict ``targets``.
        weight: ``(V, H)`` LM head weight; ``bias``: ``(V,)`` or None.
        targets: ``(N,)`` token ids.
        temperature: divides the logits (values <= 0 are treated as 1, as on the plain path).
        chunk_size: tokens per chunk; at most ``(chunk_size, V)`` logits exist at a time.
        with_entropy: also return the per-token entropy of that distribution.
        float32_logits: keep the matmul's output in float32 when it runs in 16 bits, instead of
            rounding the logits to 16 bits (``model.float32_logits``; see the config's doc).

    Returns:
        ``(N,)`` float32 logprobs and ``(N,)`` float32 entropies (None unless ``with_entropy``),
        both differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Under autocast the matmul runs in the autocast dtype (as the LM head would), the rest in float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not (temperature > 0):
        temperature = 1.0
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if bias is not None:
        bias = bias.to(dtype)
    logprobs, entropy = ChunkedLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), int(chunk_size), bool(with_entropy), bool(float32_logits)
    )
    return logprobs, (entropy if with_entropy else None)
