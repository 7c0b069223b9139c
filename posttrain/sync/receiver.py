"""The engine's side of weight sync: what `posttrain serve`'s weight-update endpoints do.

Framework-free, so it can be tested without HTTP: each method takes the fields of one
SGLang-style request and loads the weights through ``engine.update_weights`` (which copies in
place by Hugging Face name, see ``posttrain.models.weights``).

``init_group`` touches no engine state and may run on any thread (the server runs it off the
engine's, so generation goes on while the rendezvous waits); the other methods run where the
engine is safe to change. ``group_states`` says which groups are joined and which still joining.
"""

from __future__ import annotations

import base64
import glob
import logging
import os
import threading
import uuid
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  registers torch's reductions (shared memory, CUDA IPC) with ForkingPickler
from safetensors.torch import load_file

from posttrain.models.weights import share_named_tensors, weights_checksum
from posttrain.sampling import RolloutEngine
from posttrain.sync.base import DTYPES, SyncError
from posttrain.sync.broadcast import WeightGroup

logger = logging.getLogger("posttrain.sync")
INITIAL_VERSION = "initial"


class WeightReceiver:
    def __init__(self, engine: RolloutEngine, *, allow_pickled_tensors: bool = False) -> None:
        self.engine = engine
        self.allow_pickled_tensors = allow_pickled_tensors
        self.groups: dict[str, WeightGroup] = {}
        self._joining: dict[str, int] = {}  # group name -> id of the join under way
        self._join_ids = 0
        self._lock = threading.Lock()  # groups and _joining change on the group thread, are read by others
        self.weight_version = INITIAL_VERSION
        self._labelled_updates = 0
        self.instance_id = uuid.uuid4().hex  # a restarted server has a new one: the trainer then re-syncs

    @property
    def device(self) -> torch.device:
        device = getattr(self.engine, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")

    def _set_version(self, version: str | None) -> None:
        """After an update that carried ``weight_version`` (SGLang's label; a broadcast sends it with
        its last bucket, once all the weights are in). The engine stamps every token it samples with
        its integer ``weight_version``, which ``/generate`` reports per token: a numeric label is used
        as it is (posttrain's trainer sends its policy version), any other label counts labelled
        updates (1, 2, ...). An update without a label leaves both as they were."""
        if version is None:
            return
        self.weight_version = version
        self._labelled_updates += 1
        if hasattr(self.engine, "weight_version"):
            self.engine.weight_version = int(version) if _is_integer(version) else self._labelled_updates

    # -- broadcast ------------------------------------------------------------------------------

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str, timeout_s: float = 120.0) -> str:
        """Join the trainer's group (blocks up to about ``timeout_s``); a ``SyncError`` names the
        address when the rendezvous or a peer does not answer in time."""
        if rank_offset >= world_size:
            raise SyncError(f"rank_offset {rank_offset} must be below world_size {world_size}.")
        with self._lock:
            old = self.groups.pop(group_name, None)
            self._join_ids += 1
            join_id = self._joining[group_name] = self._join_ids
        if old is not None:
            old.close()
        if backend == "nccl" and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread: this one joins, the engine's receives
        try:
            # One engine process is one rank (no tensor parallelism): its rank is the offset.
            group = WeightGroup(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)
        except (RuntimeError, ValueError, OSError) as exc:  # torch's DistError and socket errors
            with self._lock:
                if self._joining.get(group_name) == join_id:
                    del self._joining[group_name]
            reason = (str(exc).splitlines() or [""])[0][:300]
            raise SyncError(f"Could not join weight-update group '{group_name}' at {master_address}:{master_port} "
                            f"within {timeout_s:g} s ({type(exc).__name__}: {reason}). Check that the trainer is "
                            "running there and that this server can reach the address, or raise "
                            "--weight-sync-timeout-s.") from None
        with self._lock:
            wanted = self._joining.get(group_name) == join_id
            if wanted:
                del self._joining[group_name]
                self.groups[group_name] = group
        if not wanted:  # the request gave up waiting, or a newer join replaced this one
            group.close()
            raise SyncError(f"Joining weight-update group '{group_name}' was abandoned (timed out or replaced).")
        return f"joined group '{group_name}' as rank {rank_offset} of {world_size} ({backend})"

    def abandon_group(self, group_name: str) -> None:
        """The caller stopped waiting for a join: the group is closed if it forms later."""
        with self._lock:
            self._joining.pop(group_name, None)

    def group_states(self) -> dict[str, str]:
        """``{name: "joined" | "joining"}`` for /health."""
        with self._lock:
            return {**{name: "joined" for name in self.groups}, **{name: "joining" for name in self._joining}}

    def destroy_group(self, group_name: str) -> str:
        with self._lock:
            group = self.groups.pop(group_name, None)
        if group is None:
            raise SyncError(f"No weight-update group named '{group_name}'.")
        group.close()
        return f"left group '{group_name}'"

    def receive_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                            weight_version: str | None = None) -> str:
        group = self.groups.get(group_name)
        if group is None:
            raise SyncError(f"No weight-update group named '{group_name}'; call /init_weights_update_group first.")
        if not len(names) == len(dtypes) == len(shapes):
            raise SyncError(f"names, dtypes and shapes must have the same length ({len(names)}, {len(dtypes)}, "
                            f"{len(shapes)}).")
        unknown = [d for d in dtypes if d.removeprefix("torch.") not in DTYPES]
        if unknown:
            raise SyncError(f"Unsupported dtype '{unknown[0]}'; use one of {', '.join(DTYPES)}.")
        device = self.device if group.backend == "nccl" else torch.device("cpu")
        received = {}
        # Every announced tensor is received, even if loading then fails, so the sender never hangs.
        bad = next(((n, s) for n, s in zip(names, shapes) if any(d < 0 for d in s)), None)
        if bad is not None:
            raise SyncError(f"Shape {bad[1]} of '{bad[0]}' has a negative dimension.")
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=DTYPES[dtype.removeprefix("torch.")], device=device)
            received[name] = group.broadcast(tensor)
        self.engine.update_weights(received)
        self._set_version(weight_version)
        return f"loaded {len(received)} tensors"

    # -- checkpoint ------------------------------------------------------------------------------

    def load_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None) -> str:
        if load_format not in (None, "auto", "safetensors"):
            raise SyncError(f"load_format '{load_format}' is not supported; the server reads safetensors files.")
        files = sorted(glob.glob(os.path.join(model_path, "*.safetensors"))) if os.path.isdir(model_path) else (
            [model_path] if model_path.endswith(".safetensors") and os.path.isfile(model_path) else [])
        if not files:
            raise SyncError(f"No .safetensors files at '{model_path}' (on the server's file system).")
        count = 0
        for file in files:
            tensors = load_file(file, device=str(self.device))  # straight to the engine's device
            self.engine.update_weights(tensors)
            count += len(tensors)
        self._set_version(weight_version)
        return f"loaded {count} tensors from {len(files)} file(s)"

    # -- tensors in the request ------------------------------------------------------------------

    def load_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                         weight_version: str | None = None) -> str:
        """SGLang's format: each item is a base64 pickle (``ForkingPickler``) of a list of
        ``(name, tensor)``; with one engine rank only the first item is read. Unpickling runs
        code chosen by the sender, so it is refused unless the server was started with
        ``--enable-tensor-updates``. ``load_format="shared"`` (a posttrain extension) makes the
        model compute with the received tensors themselves instead of copying them: with CUDA IPC
        handles or CPU shared memory, the trainer's parameters (sync.mode=shared)."""
        if not self.allow_pickled_tensors:
            raise SyncError("update_weights_from_tensor unpickles the request, which runs code chosen by the sender; "
                            "start the server with --enable-tensor-updates if the trainer is trusted.")
        if not serialized_named_tensors:
            raise SyncError("serialized_named_tensors is empty.")
        if load_format not in (None, "shared"):
            raise SyncError(f"load_format '{load_format}' is not supported here; use null (copy) or 'shared'.")
        named = ForkingPickler.loads(base64.b64decode(serialized_named_tensors[0]))
        if load_format == "shared":
            count = share_named_tensors(self._model(), named)
            moved = getattr(self.engine, "parameters_moved", None)
            if moved is not None:  # posttrain's engine: CUDA graphs hold parameter addresses
                moved()
            self._set_version(weight_version)
            return f"sharing {count} tensors with the sender"
        self.engine.update_weights(dict(named))
        self._set_version(weight_version)
        return f"loaded {len(named)} tensors"

    # -- LoRA ------------------------------------------------------------------------------------

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> str:
        load = getattr(self.engine, "load_lora_adapter", None)
        if load is None:
            raise SyncError(f"This engine ({type(self.engine).__name__}) cannot load LoRA adapters.")
        if not os.path.isfile(os.path.join(lora_path, "adapter_config.json")):
            raise SyncError(f"'{lora_path}' holds no adapter_config.json (on the server's file system).")
        load(lora_path)
        return f"loaded adapter '{lora_name}'"

    # -- inspection ------------------------------------------------------------------------------

    def _model(self) -> torch.nn.Module:
        model = getattr(self.engine, "model", None)
        if model is None:
            raise SyncError(f"This engine ({type(self.engine).__name__}) does not expose its model.")
        return model

    def checksum(self) -> str:
        return weights_checksum(self._model())

    def info(self) -> dict[str, Any]:
        return {"weight_version": self.weight_version, "instance_id": self.instance_id}


def _is_integer(label: str) -> bool:
    try:
        int(label)
    except ValueError:
        return False
    return True
