"""``sync.mode=checkpoint``: write safetensors, the engine reloads them straight to its device.

The robust fallback: it needs nothing but a folder both sides can read. By default the folder
is in /dev/shm, so "disk" is memory: saving is a memory copy and the engine's load maps the file.
The file is written under a temporary name and renamed, so the engine never reads half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import torch

from posttrain.models.weights import iter_weight_buckets
from posttrain.sync.base import transfer_dir
from posttrain.sync.client import EngineClient

WEIGHTS_FILE = "model.safetensors"


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class StagingBuffer:
    """A reusable pinned host buffer for weights on a GPU: every tensor is copied into it
    asynchronously, then one synchronisation and one write. safetensors' own ``save_file`` copies
    each tensor to pageable memory with a sync per tensor before it writes."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, nbytes: int, pinned: bool) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes or self.buffer.is_pinned() != pinned:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return self.buffer[:nbytes]


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, staging: StagingBuffer | None = None,
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (any devices) as one safetensors file; returns the data bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    on_gpu = any(t.is_cuda for t in tensors.values())
    chunks = [t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors.values()]
    if on_gpu:  # one asynchronous device-to-host copy per tensor into pinned memory, one sync
        buffer = (staging or StagingBuffer()).get(offset, pinned=True)
        position = 0
        for chunk in chunks:
            buffer[position : position + chunk.numel()].copy_(chunk, non_blocking=True)
            position += chunk.numel()
        torch.cuda.synchronize()
        chunks = [buffer]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for chunk in chunks:  # CPU tensors are written from their own memory, without a copy
            f.write(memoryview(chunk.numpy()))
    return offset


def save_weights(model: torch.nn.Module, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                 staging: StagingBuffer | None = None) -> int:
    """Write the model's parameters (each tied weight once) to ``folder/model.safetensors``,
    atomically, with the model's config.json (SGLang reads it); returns the bytes written."""
    tensors = {name: t for bucket in iter_weight_buckets(model, float("inf"), dtype) for name, t in bucket}
    tmp = os.path.join(folder, WEIGHTS_FILE + ".tmp")
    written = write_safetensors(tensors, tmp, staging)
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file") and not os.path.exists(os.path.join(folder, "config.json")):
        config.to_json_file(os.path.join(folder, "config.json"))
    return written


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
        self.staging = StagingBuffer()  # kept between syncs: pinning a GB of host memory takes longer than the copy

    def connect(self, step: int = 0) -> None:
        pass

    def push(self, version: int, step: int) -> int:
        written = save_weights(self.model, self.folder, self.dtype, self.staging)
        self.client.update_weights_from_disk(str(self.folder), weight_version=str(version))
        return written

    def close(self) -> None:
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
