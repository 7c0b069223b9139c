"""Turning tokenized conversations into token-budget steps and micro-batches.

**Packing choice (measured, not assumed).** With ``data.packing=true`` several conversations
share one row and their ``position_ids`` restart at 0 at each one; no attention mask is passed.
transformers then derives a block-diagonal causal mask from the position restarts
(``masking_utils.find_packed_sequence_indices``; flash-attention uses them as varlen
boundaries), so no token attends across conversations. This holds ONLY when ``attention_mask``
is None and no KV cache exists (``use_cache=False``: Llama otherwise creates an empty cache and
the packed mask is skipped). Measured on the tiny test Llama, per-token NLL of three packed
documents vs each alone: transformers 5.23, CPU, fp32, sdpa and eager: max difference 4.8e-7
with ``attention_mask=None, use_cache=False``; 0.19 with ``use_cache`` left on or with an
all-ones attention mask (cross-document leakage). transformers 5.17, H100, sdpa and eager, fp32
and bf16 autocast: summed NLL of a packed row vs its documents alone agree to 3e-7 (relative),
and the probe below says True. ``tests/trainer/test_sft.py`` asserts the
equivalence, and :func:`position_ids_isolate_documents` re-checks it on the actual model at
start: a model whose attention ignores the restarts (e.g. remote code) falls back to the
padded layout with a warning.

The fallback and ``data.packing=false`` use one conversation per row, right-padded with an
attention mask, rows sorted by length so a micro-batch holds rows of similar length.

Rows hold at most ``max_seq_len`` tokens either way (attention cost stays per-row bounded), and
a micro-batch holds at most ``micro_batch_tokens`` tokens counting padding (rows x longest row).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from posttrain.data.sampler import EpochSampler
from posttrain.data.sft import SFTExample

IGNORE_INDEX = -100  # label of positions without loss (torch cross_entropy's default ignore_index)


@dataclass
class MicroBatch:
    """input_ids/position_ids/labels: (rows, row_len). ``labels[r, j]`` is the token position j
    predicts, or IGNORE_INDEX. ``attention_mask`` is None for packed rows (see module docstring)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    num_real_tokens: int

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_slots(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "MicroBatch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device), mask,
                          self.num_real_tokens)


def pack_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of documents per row, first-fit decreasing: longest first, each into the first row
    with room. Rows hold at most ``capacity`` tokens (a longer document gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def balance_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of documents per bin: as many bins as :func:`pack_documents` needs, filled as evenly
    as possible (longest first, each into the bin with the fewest tokens), so micro-batches cost
    about the same. Falls back to first-fit decreasing when the even split would overfill a bin."""
    packed = pack_documents(lengths, capacity)
    bins: list[list[int]] = [[] for _ in packed]
    loads = [0] * len(packed)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = min(range(len(bins)), key=loads.__getitem__)
        if loads[b] and loads[b] + lengths[i] > capacity:
            return packed
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins


def group_rows(row_lengths: Sequence[int], micro_batch_tokens: int) -> list[list[int]]:
    """Rows per micro-batch: longest first, adding rows while rows x longest <= the budget."""
    groups: list[list[int]] = []
    for r in sorted(range(len(row_lengths)), key=lambda r: -row_lengths[r]):
        if groups and (len(groups[-1]) + 1) * row_lengths[groups[-1][0]] <= micro_batch_tokens:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _labels(example: SFTExample) -> list[int]:
    # Position j predicts token j + 1; the last position of a document predicts nothing.
    ids, mask = example.input_ids, example.loss_mask
    return [ids[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)] + [IGNORE_INDEX]


def build_micro_batches(examples: Sequence[SFTExample], *, micro_batch_tokens: int, max_seq_len: int,
                        packed: bool, pad_token_id: int) -> list[MicroBatch]:
    """Micro-batches holding every example once. ``packed``: several per row (position-id
    boundaries); else one per row, right-padded with an attention mask."""
    lengths = [len(ex) for ex in examples]
    rows = pack_documents(lengths, max_seq_len) if packed else [[i] for i in range(len(examples))]
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    batches = []
    for group in group_rows(row_lengths, micro_batch_tokens):
        width = max(row_lengths[r] for r in group)
        input_ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(group), width), dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for b, r in enumerate(group):
            offset = 0
            for i in rows[r]:
                n = lengths[i]
                input_ids[b, offset: offset + n] = torch.tensor(examples[i].input_ids)
                labels[b, offset: offset + n] = torch.tensor(_labels(examples[i]))
                position_ids[b, offset: offset + n] = torch.arange(n)
                offset += n
            attention_mask[b, :offset] = 1
            if packed:
                # The padding restarts its positions too, so it is a separate block of its own.
                position_ids[b, offset:] = torch.arange(width - offset)
            else:
                position_ids[b, offset:] = torch.arange(offset, width)
        batches.append(MicroBatch(input_ids, position_ids, labels, None if packed else attention_mask,
                                  int(attention_mask.sum())))
    return batches


class TokenBudgetBatcher:
    """Seeded, resumable stream of optimizer steps: each step takes whole documents in epoch
    order (an EpochSampler's) until the next one would push it past ``batch_tokens``; that one
    opens the next step. With ``epoch_bounded`` a step also ends with its epoch: the last step of
    each epoch holds what the epoch has left, so no step repeats a document (on data smaller than
    ``batch_tokens``, each step is one whole epoch). State: the sampler's plus that pending document."""

    def __init__(self, lengths: Sequence[int], batch_tokens: int, seed: int, shuffle: bool = True,
                 epoch_bounded: bool = False) -> None:
        self.lengths = list(lengths)
        self.batch_tokens = batch_tokens
        self.epoch_bounded = epoch_bounded
        self.sampler = EpochSampler(len(self.lengths), 1, seed, shuffle)
        self.pending: int | None = None

    def next_step(self) -> list[int]:
        """Indices of the next step's documents (at least one)."""
        step: list[int] = []
        tokens = 0
        while True:
            if step and self.epoch_bounded and self.pending is None and self.sampler.position == 0:
                return step  # the document just taken was its epoch's last
            index = self.pending if self.pending is not None else self.sampler.next_batch()[0]
            self.pending = None
            if step and tokens + self.lengths[index] > self.batch_tokens:
                self.pending = index
                return step
            step.append(index)
            tokens += self.lengths[index]
            if tokens >= self.batch_tokens:
                return step

    @property
    def epochs_done(self) -> float:
        """Passes over the data handed out so far (a pending document counts as not handed out)."""
        n = len(self.lengths)
        consumed = self.sampler.epoch * n + self.sampler.position - (self.pending is not None)
        return consumed / n

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Steps a fresh stream with these settings takes to hand out ``num_epochs`` passes."""
        probe = self._fresh()
        steps = 0
        while probe.epochs_done < num_epochs - 1e-9:
            probe.next_step()
            steps += 1
        return max(steps, 1)

    def epochs_for_steps(self, num_steps: int) -> float:
        """Passes over the data a fresh stream with these settings hands out in ``num_steps`` steps."""
        probe = self._fresh()
        for _ in range(num_steps):
            probe.next_step()
        return probe.epochs_done

    def _fresh(self) -> TokenBudgetBatcher:
        return TokenBudgetBatcher(self.lengths, self.batch_tokens, int(self.sampler.seed), self.sampler.shuffle,
                                  self.epoch_bounded)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pending = state["pending"]


@torch.no_grad()
def position_ids_isolate_documents(model: torch.nn.Module, autocast: Any = None) -> bool:
    """Whether ``model`` keeps packed documents apart by position-id restarts alone: the
    log-probs of a document packed after another must equal those of the document alone."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=g) for n in (11, 9))
    packed_ids = torch.cat([first, second])[None].to(device)
    packed_pos = torch.cat([torch.arange(11), torch.arange(9)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with autocast() if autocast is not None else contextlib.nullcontext():
            packed = model(input_ids=packed_ids, position_ids=packed_pos, use_cache=False).logits[0, 11:]
            alone = model(input_ids=second[None].to(device), position_ids=torch.arange(9)[None].to(device),
                          use_cache=False).logits[0]
    finally:
        model.train(was_training)
    # The largest L1 distance between next-token distributions. Compared as probabilities, not
    # log-probs: with a 150k vocabulary, bf16 rounding moves some rare token's log-prob by more than
    # 5e-2 even when two kernels agree (sdpa for the document alone, flex for the packed row), while
    # its probability mass stays negligible. Attending across documents moves the distribution itself.
    diff = (packed.float().softmax(-1) - alone.float().softmax(-1)).abs().sum(-1).max().item()
    tolerance = 1e-3 if packed.dtype == torch.float32 else 0.1
    return diff < tolerance
