"""16-bit copies of a float32 policy's weights, pointed to while the engine generates.

The trainer keeps float32 parameters (master weights) and runs its passes under bf16 autocast. An
engine on the same modules under the same autocast would cast every matmul weight at every decode
step: reading 4 bytes, writing 2 and reading 2 again per weight instead of reading 2, which is what
bounds a decode step. So the weights are cast once per weight change into copies, and the
parameters point at the copies while the engine runs:

- GPU (``persistent``): the copies are allocated once and cast into in place, so CUDA graphs
  captured on them stay valid across weight updates. Only weights whose every use is a matmul that
  autocast casts anyway are copied (float32, at least 2-D, not an embedding table, not a float32
  router), so the numbers are exactly autocast's. A head tied to the embedding table gets a copy
  of its own that the paged decoder's head reads (``shadows``); the lookup stays float32.
- CPU (``rollout.engine.cpu_dtype=bfloat16``, no autocast): fresh copies of every float32 weight
  but float32 routers for each ``generate()`` call, freed when it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from posttrain.models.moe import float32_router_parameters


class WeightCopies:
    """``dtype`` copies of ``swapped`` (pointed to inside :meth:`swapped`) and of ``shadows``
    (never pointed to: read directly, as the paged decoder reads a tied head's copy)."""

    def __init__(self, swapped: list[torch.nn.Parameter], dtype: torch.dtype, *, persistent: bool,
                 shadows: list[torch.nn.Parameter] = ()) -> None:
        self.params = swapped
        self.shadows = list(shadows)
        self.dtype = dtype
        self.persistent = persistent
        self.active = False
        self.stale = False  # the weights changed since the last cast (refresh() clears it)
        self._masters: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self.shadow_copies: list[torch.Tensor] = []
        if persistent:
            self._copies = [torch.empty_like(p, dtype=dtype) for p in self.params]
            self.shadow_copies = [torch.empty_like(p, dtype=dtype) for p in self.shadows]
            self.refresh()

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in (*self._copies, *self.shadow_copies))

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the float32 weights into the copies (after the weights changed)."""
        self.stale = False
        if not self.persistent:
            if self.active:
                self._copies = [m.to(self.dtype) for m in self._masters]
                self._point(self._copies)
            return
        masters = self._masters if self.active else [p.data for p in self.params]
        for copy, master in zip(self._copies, masters):
            copy.copy_(master)
        for copy, p in zip(self.shadow_copies, self.shadows):
            copy.copy_(p.data)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The parameters point at the copies inside; re-entrant."""
        if self.active:
            yield
            return
        self._masters = [p.data for p in self.params]
        if not self.persistent:
            self._copies = [m.to(self.dtype) for m in self._masters]
        self._point(self._copies)
        self.active = True
        try:
            yield
        finally:
            self._point(self._masters)
            self.active = False
            self._masters = []
            if not self.persistent:
                self._copies = []

    @contextlib.contextmanager
    def masters_exposed(self) -> Iterator[None]:
        """Inside ``swapped()``: the parameters point at the float32 weights (to load new ones into
        them), then at freshly cast copies again."""
        if not self.active:
            yield
            return
        self._point(self._masters)
        try:
            yield
        finally:
            self._masters = [p.data for p in self.params]  # a loader may have replaced them
            if self.persistent:
                self.refresh()
            else:
                self._copies = [m.to(self.dtype) for m in self._masters]
            self._point(self._copies)

    def _point(self, tensors: list[torch.Tensor]) -> None:
        for p, t in zip(self.params, tensors):
            p.data = t


def gpu_weight_copies(model: torch.nn.Module, lm_head: torch.nn.Module, dtype: torch.dtype) -> WeightCopies | None:
    """Persistent ``dtype`` copies of the float32 matmul weights of ``model`` (see the module
    docstring); None when there are none (a model already in 16 bits)."""
    embeddings = {m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    routers = float32_router_parameters(model)
    swapped = [p for p in model.parameters()  # each shared parameter once
               if p.dtype == torch.float32 and p.dim() >= 2 and p not in embeddings and p not in routers]
    head = getattr(lm_head, "weight", None)
    shadows = [head] if head is not None and head in embeddings and head.dtype == torch.float32 else []
    if not swapped and not shadows:
        return None
    return WeightCopies(swapped, dtype, persistent=True, shadows=shadows)


def cpu_weight_copies(model: torch.nn.Module, dtype: torch.dtype) -> WeightCopies:
    """Per-call ``dtype`` copies of every float32 weight but float32 routers (CPU bf16 rollouts)."""
    routers = float32_router_parameters(model)
    params = [p for p in model.parameters() if p.dtype == torch.float32 and p not in routers]
    return WeightCopies(params, dtype, persistent=False)
