"""The PPO critic: a causal LM's transformer with a linear value head.

The critic scores the state before each response token: its value at response token ``r`` is
read from the hidden state of the position that *predicts* that token (one before it), exactly
the positions whose logits :func:`~posttrain.models.logprobs.response_logprobs` gathers. So
``values[:, r]`` and ``logprobs[:, r]`` belong to the same step of the episode.

The head is zero-initialised: every value starts at 0, so the first advantages are the plain
(shaped) returns, and no random head adds noise to the first updates. The backbone still learns
from the first step on once the head has moved (its gradient is proportional to the head's
weights).

Checkpoint layout (``<ckpt>/critic/``): the backbone in Hugging Face format (``config.json``,
``model.safetensors``; ``AutoModel.from_pretrained`` loads it) plus ``value_head.pt``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from posttrain.errors import PosttrainError
from posttrain.models.logprobs import TokenBatch

HEAD_FILE = "value_head.pt"


class ValueModel(nn.Module):
    """``backbone`` (a transformer returning hidden states) + ``head`` (hidden -> 1)."""

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        param = next(backbone.parameters())
        self.head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: PreTrainedModel) -> ValueModel:
        """A critic whose backbone is a copy of ``lm``'s transformer (without its LM head)."""
        return cls(copy.deepcopy(lm.base_model))

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str, attn_implementation: str = "sdpa") -> ValueModel:
        """Load a critic written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise PosttrainError(f"'{folder}' holds no critic ({HEAD_FILE} is missing); was it saved by `posttrain ppo`?")
        backbone = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
        critic = cls(backbone.to(device))
        critic.head.load_state_dict(torch.load(folder / HEAD_FILE, map_location=device, weights_only=True))
        return critic

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / HEAD_FILE)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Values ``(B, R)`` of the states before each response token (float32; padded positions
        hold arbitrary values: mask them)."""
        L = batch.input_ids.shape[1]
        R = batch.response_len
        out = self.backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state  # (B, L, H)
        # The same positions as response_logprobs: response token r of row i is predicted at
        # prompt_len_i - 1 + r; past-the-end entries are padding (masked by the caller).
        positions = batch.prompt_lens.unsqueeze(1) - 1 + torch.arange(R, device=hidden.device)
        positions = positions.clamp(max=L - 1)
        gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.head(gathered.float()).squeeze(-1)
