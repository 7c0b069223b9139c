"""Per-token logprobs (and entropy) of response tokens under a causal LM.

Batches are right-padded: each row is its prompt followed directly by its response, then padding.
Left padding would give the leading pad positions a fully masked attention row, whose softmax
backward yields NaN gradients in some fused GPU kernels; with right padding every position sees
at least one real token. Only the logits of positions that predict response tokens are computed
(``logits_to_keep``), never those of most of the prompt.

With ``chunk_size > 0`` the LM head is not run by the model: the backbone's final hidden states of
the response positions go to :func:`~posttrain.models.chunked_logprobs.chunked_logprobs`, which
never holds more than ``chunk_size`` tokens' logits (forward or backward). Models whose logits are
not a plain ``Linear`` of the last hidden state (soft-capping, logit scaling, a LoRA-wrapped head)
use the plain path instead, with a one-time log line.

A packed batch (:func:`make_packed_token_batch`) holds several samples per row, each
[prompt + response] with position ids restarting at 0, and no attention mask: transformers then
builds a block-diagonal causal mask from the position restarts (see posttrain/data/packing.py), so
no token sees another sample's. Logits are computed only at the positions that predict response
tokens, on either path, and the results are laid out (B, R) per sample as for a padded batch.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from posttrain.algorithms import entropy_from_logits
from posttrain.distributed.fsdp import forward_through_root
from posttrain.models.chunked_logprobs import AUTO_CHUNK, chunked_logprobs, resolve_chunk_size
from posttrain.models.packed_attention import VARLEN_NAME, document_ids, known_documents, varlen_kwargs

logger = logging.getLogger("posttrain.models")

# Config attributes that change the logits after the LM head (value that means "no change").
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,
}
_fallback_logged: weakref.WeakSet = weakref.WeakSet()


@dataclass
class TokenBatch:
    """Padded: input_ids/attention_mask/position_ids (B, L), one sample per row.
    Packed (``response_starts`` set): input_ids/position_ids (rows, T), several samples per row,
    attention_mask None. Both: prompt_lens (B,); response_mask (B, R)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    prompt_lens: torch.Tensor
    response_mask: torch.Tensor
    response_starts: torch.Tensor | None = None  # packed: (B,) column of each sample's first response token
    sample_rows: torch.Tensor | None = None  # packed: (B,) row holding each sample
    # packed: transformers' flash-attention keywords (document boundaries), computed on the host
    document_kwargs: dict | None = None
    # prediction_index(), computed on the host when the batch is built (no device sync to find it)
    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # packed: transformers' document ids of the rows, computed on the host (see known_documents)
    document_ids: torch.Tensor | None = None
    # (rows (B,), columns (B,)) of each sample's first token, kept on the host (see lay_out_per_token)
    sample_starts: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def is_packed(self) -> bool:
        return self.response_starts is not None

    def prediction_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of every response token in the (B, R) layout, and ``(seq_rows, positions)``
        of the input position whose logits predict it (one before the token: response token r of
        sample b sits at its first response column + r)."""
        if self.index is not None:
            return self.index
        rows, cols = self.response_mask.nonzero(as_tuple=True)
        if self.response_starts is None:
            return rows, cols, rows, self.prompt_lens[rows] - 1 + cols
        return rows, cols, self.sample_rows[rows], self.response_starts[rows] - 1 + cols


def _response_mask(responses: list[list[int]]) -> torch.Tensor:
    """(B, R) float: 1 on each response's tokens, R the longest response (at least 1)."""
    lengths = np.array([len(r) for r in responses], dtype=np.int64)
    width = max(int(lengths.max()) if len(responses) else 0, 1)
    return torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.float32))


def _flat_ids(prompts: list[list[int]], responses: list[list[int]], order) -> np.ndarray:
    """[prompt + response] of the samples in ``order``, concatenated: one conversion to an array
    (numpy reads a Python iterable about 3x faster than ``torch.tensor``)."""
    ids = chain.from_iterable(chain(prompts[i], responses[i]) for i in order)
    return np.fromiter(ids, dtype=np.int64)


def make_token_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> TokenBatch:
    B = len(prompts)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=torch.long)
    L = int(lengths.max())
    attention_mask = (torch.arange(L) < lengths[:, None]).long()
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    input_ids[attention_mask.bool()] = torch.from_numpy(_flat_ids(prompts, responses, range(B)))
    position_ids = torch.arange(L).expand(B, L).contiguous()
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    host = TokenBatch(input_ids, attention_mask, position_ids, prompt_lens, _response_mask(responses))
    host.index = host.prediction_index()
    host.sample_starts = (torch.arange(B), torch.zeros(B, dtype=torch.long))
    return _to_device(host, device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without waiting: a copy from
    pageable memory would first wait for all queued GPU work, stalling the CPU once per tensor."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_device(batch: TokenBatch, device: torch.device | str) -> TokenBatch:
    move = (lambda t: None if t is None else to_device(t, device))
    return TokenBatch(
        move(batch.input_ids), move(batch.attention_mask), move(batch.position_ids), move(batch.prompt_lens),
        move(batch.response_mask), move(batch.response_starts), move(batch.sample_rows),
        None if batch.document_kwargs is None else {k: move(v) if isinstance(v, torch.Tensor) else v
                                                     for k, v in batch.document_kwargs.items()},
        None if batch.index is None else tuple(move(t) for t in batch.index),
        move(batch.document_ids),
        batch.sample_starts,  # stays on the host
    )


def lay_out_per_token(batch: TokenBatch, values: list[torch.Tensor], fill: int = 0) -> torch.Tensor:
    """Per-token values of each sample laid out like ``batch.input_ids``: ``values[b]`` is ``(n_b,
    *rest)`` for the first ``n_b`` tokens of sample b (at most its prompt + response length), and the
    result is ``(rows, width, *rest)`` on the host, ``fill`` wherever no value was given (padding,
    and tokens past ``n_b``). Padded batches: row b holds sample b from column 0; packed ones: the
    samples' documents after each other, as their tokens are."""
    rows, cols = batch.sample_starts
    first = values[0]
    out = torch.full((*batch.input_ids.shape, *first.shape[1:]), fill, dtype=first.dtype)
    lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.long)
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    out[rows.repeat_interleave(lengths), cols.repeat_interleave(lengths) + offsets] = torch.cat(values)
    return out


def make_packed_token_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu",
    rows: list[list[int]] | None = None,
) -> TokenBatch:
    """Samples packed into rows, [prompt + response] after each other, with position ids restarting
    at 0 per sample (see the module docstring for the document masking). ``rows``: the sample
    indices of each row (None: all in one row, no padding). Shorter rows are right-padded; the
    padding restarts its positions too, so it is a document of its own that no sample sees."""
    rows = [list(range(len(prompts)))] if rows is None else rows
    if any(not row for row in rows):
        raise ValueError("make_packed_token_batch: every row must hold at least one sample")
    # Index arithmetic in numpy: small host ops cost microseconds there, often milliseconds in torch.
    prompt_lens = np.array([len(p) for p in prompts], dtype=np.int64)
    response_lens = np.array([len(r) for r in responses], dtype=np.int64)
    lengths = prompt_lens + response_lens
    # All rows concatenated, samples in row order: where each sample and each row starts in that.
    order = np.fromiter(chain.from_iterable(rows), dtype=np.int64)
    row_sizes = np.array([len(row) for row in rows], dtype=np.int64)
    ordered_lengths = lengths[order]
    global_starts = np.cumsum(ordered_lengths) - ordered_lengths
    ordered_rows = np.repeat(np.arange(len(rows)), row_sizes)
    row_global_starts = global_starts[np.cumsum(row_sizes) - row_sizes]
    row_lengths = np.bincount(ordered_rows, weights=ordered_lengths, minlength=len(rows)).astype(np.int64)
    width = int(row_lengths.max())
    # Each token's place in the (rows, width) batch, and its position id (restarting per sample).
    token_global = np.arange(int(ordered_lengths.sum()))
    token_rows = np.repeat(ordered_rows, ordered_lengths)
    flat_index = token_rows * width + token_global - row_global_starts[token_rows]
    input_ids = np.full(len(rows) * width, pad_token_id, dtype=np.int64)
    input_ids[flat_index] = _flat_ids(prompts, responses, order)
    # Padding restarts its positions too (a document of its own): column minus the row's length.
    position_ids = (np.arange(width)[None, :] - row_lengths[:, None]).reshape(-1)
    position_ids[flat_index] = token_global - np.repeat(global_starts, ordered_lengths)
    position_ids = position_ids.reshape(len(rows), width)
    sample_rows = np.empty(len(prompts), dtype=np.int64)
    sample_rows[order] = ordered_rows
    response_starts = np.empty(len(prompts), dtype=np.int64)
    response_starts[order] = global_starts - row_global_starts[ordered_rows]
    response_starts += prompt_lens
    # prediction_index(): response token r of sample b, predicted at its first response column - 1 + r.
    index_rows = np.repeat(np.arange(len(prompts)), response_lens)
    index_cols = np.arange(len(index_rows)) - np.repeat(np.cumsum(response_lens) - response_lens, response_lens)
    index = (index_rows, index_cols, sample_rows[index_rows], response_starts[index_rows] - 1 + index_cols)
    host = TokenBatch(
        torch.from_numpy(input_ids.reshape(len(rows), width)), None, torch.from_numpy(position_ids),
        torch.from_numpy(prompt_lens), _response_mask(responses), torch.from_numpy(response_starts),
        torch.from_numpy(sample_rows), varlen_kwargs(position_ids), tuple(torch.from_numpy(a) for a in index),
        document_ids(position_ids), (torch.from_numpy(sample_rows), torch.from_numpy(response_starts - prompt_lens)),
    )
    return _to_device(host, device)


# attn_implementations that read the document boundaries of a packed batch from keywords.
_BOUNDARY_KEYWORD_ATTENTION = {VARLEN_NAME, "flash_attention_2", "flash_attention_3"}


def _document_kwargs(model: torch.nn.Module, batch: TokenBatch) -> dict:
    """The packed batch's document boundaries for kernels that take them, else nothing."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if batch.document_kwargs is None or implementation not in _BOUNDARY_KEYWORD_ATTENTION:
        return {}
    return batch.document_kwargs


def response_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int | str = 0,
    float32_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (B, R) of the response tokens under ``softmax(logits / temperature)``, and
    optionally the per-token entropy (B, R) of that distribution (detached unless ``entropy_grad``).

    Computed as ``logit[token] - logsumexp(logits)`` so the full (B, R, V) log-softmax tensor is
    never materialised a second time. Padded positions hold arbitrary values: mask them.

    ``chunk_size > 0`` computes the same values chunk by chunk from the backbone's hidden states
    (see the module docstring); 0 runs the model's own LM head over all kept positions; ``"auto"``
    sizes the chunk from the vocabulary and the device's memory (:func:`resolve_chunk_size`).

    ``float32_logits`` keeps the LM head's output in float32 when its matmul runs in 16 bits
    (``model.float32_logits``). It takes the chunked path, in one chunk when ``chunk_size`` is 0;
    a model that cannot (see the module docstring) gets its own head's logits."""
    if chunk_size == AUTO_CHUNK or chunk_size > 0 or float32_logits:
        parts = _backbone_and_head(model)
        if parts is not None:
            chunk_size = resolve_chunk_size(chunk_size, parts[1].weight.shape[0], parts[1].weight.device,
                                            _logit_bytes(parts[1].weight, float32_logits))
            # Through the root's forward: under FSDP that gathers the head's (tied) weight.
            return forward_through_root(
                model, _chunked_response_logprobs, *parts, batch, temperature=temperature, with_entropy=with_entropy,
                entropy_grad=entropy_grad, chunk_size=chunk_size if chunk_size > 0 else 1 << 30,
                float32_logits=float32_logits,
            )
    if batch.is_packed:
        return _packed_response_logprobs(model, batch, temperature=temperature, with_entropy=with_entropy,
                                         entropy_grad=entropy_grad)
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


def _packed_response_logprobs(
    model: torch.nn.Module, batch: TokenBatch, *, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain path for a packed batch: the model's LM head at the predicting positions only."""
    rows, cols, seq_rows, positions = batch.prediction_index()
    # Logits only at the columns that predict a response token in some row.
    keep, column = torch.unique(positions, return_inverse=True)
    with known_documents(batch.position_ids, batch.document_ids):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=None,  # the position-id restarts are the document boundaries
            position_ids=batch.position_ids,
            logits_to_keep=keep,
            use_cache=False,
            **_document_kwargs(model, batch),
        )
    logits = out.logits[seq_rows, column].float()  # (N, V)
    if temperature != 1.0 and temperature > 0:
        logits = logits / temperature
    targets = batch.input_ids[seq_rows, positions + 1]
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    shape = batch.response_mask.shape
    full_entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
            full_entropy = entropy.new_zeros(shape).index_put((rows, cols), entropy)
    return logprobs.new_zeros(shape).index_put((rows, cols), logprobs), full_entropy


def _logit_bytes(head_weight: torch.Tensor, float32_logits: bool) -> int:
    """Bytes per logit of the chunked LM head: float32 when kept so, else the matmul's dtype."""
    device_type = head_weight.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head_weight.dtype
    return 4 if float32_logits else dtype.itemsize


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The module giving the final hidden states and the LM head whose ``Linear`` of them are the
    logits, or None (logged once per model) when the model's logits are anything else."""
    causal_lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
    reason = None
    configs = [getattr(causal_lm, "config", None)]
    if configs[0] is not None and callable(getattr(configs[0], "get_text_config", None)):
        configs.append(configs[0].get_text_config())
    for cfg in configs + [causal_lm]:
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, name, neutral)
            if value is not None and value != neutral:
                reason = f"{name}={value} transforms its logits"
    get_head = getattr(causal_lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(causal_lm, "base_model", causal_lm)
    if reason is None and not (isinstance(head, torch.nn.Linear) and head.weight.is_floating_point()):
        reason = f"its LM head is a {type(head).__name__}, not a plain Linear"
    if reason is None and (backbone is causal_lm or not isinstance(backbone, torch.nn.Module)):
        reason = "it has no separate backbone module (base_model)"
    if reason is None:
        return backbone, head
    if model not in _fallback_logged:
        _fallback_logged.add(model)
        logger.info("model.chunked_logprobs: %s uses the plain logprobs path: %s.", type(causal_lm).__name__, reason)
    return None


def _chunked_response_logprobs(
    backbone: torch.nn.Module,
    head: torch.nn.Linear,
    batch: TokenBatch,
    *,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_size: int,
    float32_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, R = batch.response_mask.shape
    with known_documents(batch.position_ids, batch.document_ids):
        out = backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **_document_kwargs(backbone, batch),
        )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, H) or packed (1, T, H)
    # Only the positions that predict response tokens are computed; padded entries of the result are 0.
    rows, cols, seq_rows, positions = batch.prediction_index()
    targets = batch.input_ids[seq_rows, positions + 1]
    logprobs, entropy = chunked_logprobs(
        hidden[seq_rows, positions], head.weight, targets, bias=head.bias, temperature=temperature,
        chunk_size=chunk_size, with_entropy=with_entropy, float32_logits=float32_logits,
    )
    full_logprobs = logprobs.new_zeros(B, R).index_put((rows, cols), logprobs)
    full_entropy = None
    if entropy is not None:
        if not (entropy_grad and torch.is_grad_enabled()):
            entropy = entropy.detach()
        full_entropy = entropy.new_zeros(B, R).index_put((rows, cols), entropy)
    return full_logprobs, full_entropy
