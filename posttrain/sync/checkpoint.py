"""``sync.mode=checkpoint``: write safetensors, the engine reloads them straight to its device.

The robust fallback: it needs nothing but a folder both sides can read. By default the folder
is in /dev/shm, so "disk" is memory: saving is a memory copy and the engine's load maps the file.
The file is written under a temporary name and renamed, so the engine never reads half a file.
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import save_file

from posttrain.models.weights import iter_weight_buckets
from posttrain.sync.base import transfer_dir
from posttrain.sync.client import EngineClient

WEIGHTS_FILE = "model.safetensors"


def save_weights(model: torch.nn.Module, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Write the model's parameters (each tied weight once) to ``folder/model.safetensors``,
    atomically, with the model's config.json (SGLang reads it); returns the bytes written."""
    tensors = {name: t.contiguous() for bucket in iter_weight_buckets(model, float("inf"), dtype) for name, t in bucket}
    tmp = os.path.join(folder, WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file") and not os.path.exists(os.path.join(folder, "config.json")):
        config.to_json_file(os.path.join(folder, "config.json"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weights_nbytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters (each tied weight once) when sent as ``dtype``."""
    return sum(p.numel() * (p.element_size() if dtype is None else torch.finfo(dtype).bits // 8) for p in model.parameters())


class CheckpointSync:
    name = "checkpoint"

    def __init__(self, model: torch.nn.Module, client: EngineClient, folder: str = "",
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.client = client
        self.owns_folder = not folder
        self.folder = transfer_dir(folder, "weights", weights_nbytes(model, dtype))
        self.dtype = dtype

    def connect(self, step: int = 0) -> None:
        pass

    def push(self, version: int, step: int) -> int:
        written = save_weights(self.model, self.folder, self.dtype)
        self.client.update_weights_from_disk(str(self.folder), weight_version=str(version))
        return written

    def close(self) -> None:
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
