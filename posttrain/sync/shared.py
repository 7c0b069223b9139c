"""``sync.mode=shared``: the engine reads the trainer's parameters in place; nothing moves.

In one process (``rollout.backend=engine`` or ``hf``) the engine holds the trainer's own modules, so an
optimizer step is visible to the next generation at once.

Across processes on one machine (``rollout.backend=openai`` with `posttrain serve
--enable-tensor-updates`), :meth:`SharedSync.connect` hands the server handles to the trainer's
parameter memory once: CUDA IPC handles for GPU tensors, shared-memory files for CPU tensors
(torch's own pickling of tensors, ``torch.multiprocessing.reductions``), sent through
``/update_weights_from_tensor`` with ``load_format="shared"``. The server then computes with the
trainer's tensors themselves, and every later sync moves 0 bytes: it only tells the server to
drop caches computed with the old weights. Optimizer steps must update parameters in place
(AdamW does); the server must run on the trainer's device with the trainer's parameter dtype.
"""

from __future__ import annotations

import base64
import io
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from posttrain.sampling import RolloutEngine
from posttrain.sync.client import EngineClient


def serialize_shared(model: torch.nn.Module) -> str:
    """Handles to ``model``'s parameters (each tied weight once) in SGLang's
    ``serialized_named_tensors`` format. CPU parameters move into shared memory first (same
    values, new storage); the file-system strategy lets an unrelated process open them by name."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump([(name, param.data) for name, param in model.named_parameters()])
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    return base64.b64encode(buffer.getvalue()).decode()


class SharedSync:
    name = "shared"

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module | None = None,
                 client: EngineClient | None = None) -> None:
        """In-process: ``engine`` only. Across processes: ``model`` (the trainer's) and ``client``."""
        self.engine = engine
        self.model = model
        self.client = client

    def connect(self, step: int = 0) -> None:
        if self.client is not None and self.model is not None:
            self.client.update_weights_from_tensor([serialize_shared(self.model)], load_format="shared")

    def push(self, version: int, step: int) -> int:
        if self.client is not None:
            self.client.flush_cache()
        else:
            self.engine.update_weights(None)  # engines on the trainer's modules: nothing to copy
        return 0

    def close(self) -> None:
        pass
