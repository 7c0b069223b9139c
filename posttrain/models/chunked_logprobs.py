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
autocast would for the LM head on the plain path, so the two paths agree); the softmax, logsumexp,
entropy and their gradients are float32. Gradients w.r.t. ``W`` and the bias are accumulated in
float32 across chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """(c, H) hidden states -> (c, V) float32 logits divided by the temperature."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


class ChunkedLogprobs(torch.autograd.Function):
    """``apply(h, weight, bias, targets, temperature, chunk_size, with_entropy)`` ->
    ``(logprobs (N,), entropy (N,))`` float32; entropy is zeros when ``with_entropy`` is False."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, chunk_size, with_entropy):
        n = h.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.zeros_like(logprobs)
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                logits = _chunk_logits(h[start:end], weight, bias, temperature)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[start:end] = chunk_lse
                logprobs[start:end] = logits.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1) - chunk_lse
                if with_entropy:
                    # H = lse - E_p[z], on max-centred logits (no cancellation for large logits).
                    centred = logits - logits.amax(dim=-1, keepdim=True)
                    centred_lse = torch.logsumexp(centred, dim=-1, keepdim=True)
                    probs = torch.exp(centred - centred_lse)
                    entropy[start:end] = centred_lse.squeeze(-1) - (probs * centred).sum(dim=-1)
                del logits
        ctx.save_for_backward(h, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
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
        n = h.shape[0]
        with torch.autocast(device_type=h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h_chunk = h[start:end]
                logits = _chunk_logits(h_chunk, weight, bias, temperature)
                log_probs = logits - lse[start:end].unsqueeze(-1)
                probs = torch.exp(log_probs)
                # d lp / d z = onehot - p, times the incoming gradient.
                grad = probs * -grad_logprobs[start:end].unsqueeze(-1)
                grad.scatter_add_(-1, targets[start:end].unsqueeze(-1), grad_logprobs[start:end].unsqueeze(-1))
                if use_entropy:
                    # d H / d z = -p (log p + H).
                    grad -= probs * (log_probs + entropy[start:end].unsqueeze(-1)) * grad_entropy[start:end].unsqueeze(-1)
                del logits, log_probs, probs
                if temperature != 1.0:
                    grad = grad / temperature
                if need_b:
                    grad_b += grad.sum(dim=0)
                grad = grad.to(h.dtype)
                if need_h:
                    grad_h[start:end] = grad @ weight
                if need_w:
                    grad_w += (grad.t() @ h_chunk).float()
                del grad
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logprobs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``(N, H)`` final hidden states of the positions that predict ``targets``.
        weight: ``(V, H)`` LM head weight; ``bias``: ``(V,)`` or None.
        targets: ``(N,)`` token ids.
        temperature: divides the logits (values <= 0 are treated as 1, as on the plain path).
        chunk_size: tokens per chunk; at most ``(chunk_size, V)`` logits exist at a time.
        with_entropy: also return the per-token entropy of that distribution.

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
        hidden, weight, bias, targets, float(temperature), int(chunk_size), bool(with_entropy)
    )
    return logprobs, (entropy if with_entropy else None)
