"""Models: loading, per-token logprobs (prompt formatting is in posttrain.data.chat)."""

from posttrain.models.loading import (
    load_model_and_tokenizer,
    make_reference_model,
    model_source,
    resolve_compute_dtype,
    resolve_device,
)
from posttrain.models import packed_attention  # noqa: F401  registers attn_implementation="sdpa_flex" and "sdpa_varlen"
from posttrain.models.logprobs import TokenBatch, make_packed_token_batch, make_token_batch, response_logprobs

__all__ = [
    "TokenBatch",
    "load_model_and_tokenizer",
    "make_reference_model",
    "make_packed_token_batch",
    "make_token_batch",
    "model_source",
    "resolve_compute_dtype",
    "resolve_device",
    "response_logprobs",
]
