"""Per-token logprobs (and entropy) of response tokens under a causal LM.

Batches are right-padded: each row is its prompt followed directly by its response, then padding.
Left padding would give the leading pad positions a fully masked attention row, whose softmax
backward yields NaN gradients in some fused GPU kernels; with right padding every position sees
at least one real token. Only the logits of positions that predict response tokens are computed
(``logits_to_keep``), never those of most of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms import entropy_from_logits


@dataclass
class TokenBatch:
    """input_ids/attention_mask/position_ids: (B, L); prompt_lens: (B,); response_mask: (B, R)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_lens: torch.Tensor
    response_mask: torch.Tensor

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


def make_token_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> TokenBatch:
    B = len(prompts)
    R = max(max((len(r) for r in responses), default=0), 1)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        response_mask[i, : len(r)] = 1
    position_ids = torch.arange(L).expand(B, L).contiguous()
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return TokenBatch(
        input_ids.to(device), attention_mask.to(device), position_ids.to(device), prompt_lens.to(device),
        response_mask.to(device),
    )


def response_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (B, R) of the response tokens under ``softmax(logits / temperature)``, and
    optionally the per-token entropy (B, R) of that distribution (detached unless ``entropy_grad``).

    Computed as ``logit[token] - logsumexp(logits)`` so the full (B, R, V) log-softmax tensor is
    never materialised a second time. Padded positions hold arbitrary values: mask them."""
    L = batch.input_ids.shape[1]
    R = batch.response_len
    first = int(batch.prompt_lens.min()) - 1  # first position whose logits predict a response token
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=L - first,
        use_cache=False,
    )
    # Row i's response token r sits at position prompt_len_i + r and is predicted at one before.
    offsets = batch.prompt_lens.unsqueeze(1) - 1 - first + torch.arange(R, device=batch.input_ids.device)
    offsets = offsets.clamp(max=L - first - 1)  # past-the-end entries are padding (masked)
    logits = out.logits.gather(1, offsets.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1])).float()
    if temperature != 1.0 and temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids.gather(1, (offsets + first + 1).clamp(max=L - 1))
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = token_logits - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    return logprobs, entropy
