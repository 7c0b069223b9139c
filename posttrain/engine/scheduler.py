"""Continuous batching: which sequences run in the next step, and as prefill or as decode.

Waiting sequences are prefilled first (up to ``max_num_batched_tokens`` new tokens and
``max_num_seqs`` sequences), since a sequence in the running set costs nothing until it decodes
and every prefill makes the next decode batch larger. Otherwise all running sequences decode one
token. When a decode step needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prefill over its prompt and what it generated so far; cached blocks make that cheap).
"""

from __future__ import annotations

from collections import deque

from posttrain.engine.block_manager import BlockManager
from posttrain.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences of the next step and whether it is a prefill step."""
        scheduled: list[Sequence] = []
        num_new_tokens = 0
        # Prefill in batches: an eager prefill step costs about as much for one sequence as for
        # dozens, so while decodes are running wait until a sixteenth of the slots are free.
        free_slots = self.max_num_seqs - len(self.running)
        worth_it = not self.running or free_slots >= min(len(self.waiting), max(1, self.max_num_seqs // 16))
        while worth_it and self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            # A prompt longer than the token budget still runs, alone.
            if scheduled and num_new_tokens + len(seq) > self.max_num_batched_tokens:
                break
            self.block_manager.allocate(seq)
            num_new_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            scheduled.append(seq)
        if scheduled:
            self.running.extend(scheduled)
            return scheduled, True

        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        # Scheduled sequences keep their place ahead of those that did not fit this step.
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def recompute_running(self) -> int:
        """Send every running sequence back to the front of the queue with its blocks freed, in
        order, so that its next step is a prefill over its prompt and everything it generated: its
        keys and values are then computed again by the weights loaded now. Not counted as a
        preemption (nothing ran short of blocks). Returns how many sequences go back."""
        running, self.running = list(self.running), deque()
        for seq in reversed(running):  # appendleft: the first running sequence ends up first
            seq.status = SequenceStatus.WAITING
            self.block_manager.deallocate(seq)
            self.waiting.appendleft(seq)
        return len(running)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)

    def remove_finished(self) -> None:
        """Once per step, after ``finish`` calls (one pass instead of a removal per sequence)."""
        self.running = deque(s for s in self.running if not s.is_finished)
