"""Seeded, resumable epoch sampler over prompt indices."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from posttrain.errors import PosttrainError


class EpochSampler:
    """Yields batches of indices into a dataset of ``num_items`` items, epoch after epoch.

    Epoch ``e`` walks a permutation drawn from ``numpy.random.default_rng([seed, e])`` (or
    ``range(num_items)`` when ``shuffle`` is False), so any epoch's order can be rebuilt without
    replaying earlier ones; resuming therefore needs only ``(epoch, position)``. A batch that
    reaches the end of an epoch continues into the next one, so every batch has exactly
    ``batch_size`` indices (``batch_size`` may exceed ``num_items``). With ``epoch_bounded`` it
    ends there instead: the last batch of each epoch holds what the epoch has left, so no batch
    repeats an item and N epochs' batches hold each item exactly N times.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True,
                 epoch_bounded: bool = False) -> None:
        if num_items < 1:
            raise PosttrainError(f"cannot sample from an empty dataset (num_items={num_items}); provide at least one prompt.")
        if batch_size < 1:
            raise PosttrainError(f"batch_size must be >= 1, got {batch_size}.")
        self.num_items = num_items
        self.batch_size = batch_size
        # SeedSequence entropy must be non-negative; wrap negative seeds instead of rejecting them.
        self.seed = seed % 2**64
        self.shuffle = shuffle
        self.epoch_bounded = epoch_bounded
        self._epoch = 0
        self._position = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been handed out."""
        return self._position

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices, crossing into the next epoch when this one runs out
        (``epoch_bounded``: fewer, the rest of this epoch)."""
        batch: list[int] = []
        while len(batch) < self.batch_size and not (batch and self.epoch_bounded and self._position == 0):
            take = min(self.batch_size - len(batch), self.num_items - self._position)
            batch.extend(self._order[self._position : self._position + take].tolist())
            self._position += take
            if self._position == self.num_items:
                self._epoch += 1
                self._position = 0
                self._order = self._order_for(self._epoch)
        return batch

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Batches a fresh sampler with these settings takes to hand out ``num_epochs`` passes (>= 1)."""
        if self.epoch_bounded:
            per_epoch = math.ceil(self.num_items / self.batch_size)
            whole, fraction = divmod(num_epochs, 1)
            steps = int(whole) * per_epoch + math.ceil(round(fraction * self.num_items, 6) / self.batch_size)
        else:
            steps = math.ceil(round(num_epochs * self.num_items, 6) / self.batch_size)
        return max(steps, 1)

    def epochs_for_steps(self, num_steps: int) -> float:
        """Passes over the items a fresh sampler with these settings hands out in ``num_steps`` batches."""
        if self.epoch_bounded:
            whole, rest = divmod(num_steps, math.ceil(self.num_items / self.batch_size))
            return whole + min(rest * self.batch_size, self.num_items) / self.num_items
        return num_steps * self.batch_size / self.num_items

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``epoch``, ``position`` (and ``num_items``, checked on load)."""
        return {"epoch": self._epoch, "position": self._position, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the sampler that produced ``state`` stopped."""
        saved_items = state.get("num_items", self.num_items)
        if saved_items != self.num_items:
            raise PosttrainError(
                f"sampler state was saved for {saved_items} prompts but the data now has {self.num_items}; "
                "resume with the same data (and data.validation_size) or start a new run."
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise PosttrainError(f"invalid sampler state {state!r}: need epoch >= 0 and 0 <= position < {self.num_items}.")
        self._epoch, self._position = epoch, position
        self._order = self._order_for(epoch)
