"""Per-token logprobs (and entropy) of response tokens under a causal LM.

Batches use the layout the engines produce: prompts left-padded to a common length P, responses
right-padded to length R, so every response starts at column P and only the last R+1 positions'
logits are ever computed (``logits_to_keep``), never the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms import entropy_from_logits


@dataclass
class TokenBatch:
    """input_ids/attention_mask/position_ids: (B, P+R); response_mask: (B, R)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


def make_token_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> TokenBatch:
    """Left-pad prompts, right-pad responses, and derive positions from the attention mask (so a
    padded row sees the same positions as it would alone, as in ``generate``)."""
    P = max(len(p) for p in prompts)
    R = max(max((len(r) for r in responses), default=0), 1)
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p) : P + len(r)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention_mask[:, P:].to(torch.float32)
    return TokenBatch(
        input_ids.to(device), attention_mask.to(device), position_ids.to(device), response_mask.to(device)
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
    R = batch.response_len
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=R + 1,
        use_cache=False,
    )
    # Position j's logits predict token j+1: the R+1 kept positions end one past the last token.
    logits = out.logits[:, :-1, :].float()
    if temperature != 1.0 and temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids[:, -R:]
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = token_logits - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    return logprobs, entropy
