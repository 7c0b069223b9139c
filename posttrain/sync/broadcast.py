"""``sync.mode=broadcast``: trainer rank 0 broadcasts bucketed tensors over a torch.distributed group.

The group is separate from any training group: a ``TCPStore`` on the trainer (the rendezvous)
and a ``ProcessGroupGloo`` or ``ProcessGroupNCCL`` built on it directly, so neither side calls
``init_process_group`` and both may have other groups. The engine joins through SGLang's
``/init_weights_update_group``; each bucket is announced with ``/update_weights_from_distributed``
(names, dtypes, shapes) and then broadcast tensor by tensor, as SGLang receives it.

Every rendezvous and collective has a timeout (``sync.collective_timeout_s``): a peer that never
joins or dies mid-transfer ends the run with an error naming the engine and the step.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from posttrain.models.weights import iter_weight_buckets
from posttrain.sync.base import SyncError, dtype_name
from posttrain.sync.client import EngineClient

logger = logging.getLogger("posttrain.sync")


def master_store(address: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on ``port`` (0: a free port chosen by the OS while it
    binds, so no other process can take it between choosing and binding; read it from ``.port``).
    Create it before asking the other ranks to join, then pass it to ``WeightGroup(store=...)``."""
    return dist.TCPStore(address, port, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class WeightGroup:
    """One side of a weight-update process group: rank 0 sends, the other ranks receive."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                 backend: str, timeout_s: float, store: dist.TCPStore | None = None) -> None:
        if backend not in ("gloo", "nccl"):
            raise SyncError(f"Unknown process group backend '{backend}'; use gloo or nccl.")
        if backend == "nccl" and not dist.is_nccl_available():
            raise SyncError("NCCL is not available in this torch build (no CUDA); use sync.backend=gloo.")
        self.rank, self.world_size, self.backend, self.group_name = rank, world_size, backend, group_name
        self.timeout = timeout = datetime.timedelta(seconds=timeout_s)
        # Rank 0 may bring its store (see master_store); the others connect to master_port.
        self.store = store if store is not None else dist.TCPStore(
            master_address, master_port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore(group_name, self.store)
        if backend == "gloo":
            # Builds the full mesh now: waits for every rank, up to the timeout.
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            self._barrier_through_store(prefixed, timeout_s)  # NCCL connects lazily: check the peers now

    def _barrier_through_store(self, store: dist.Store, timeout_s: float) -> None:
        store.add("joined", 1)
        deadline = time.monotonic() + timeout_s
        while (joined := store.add("joined", 0)) < self.world_size:
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"only {joined} of {self.world_size} ranks joined")
            time.sleep(0.05)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast ``tensor`` from rank 0 (in place on the receivers); returns it."""
        wire = tensor.cpu() if self.backend == "gloo" and tensor.is_cuda else tensor
        self.pg.broadcast([wire], dist.BroadcastOptions()).wait(self.timeout)
        if wire is not tensor:
            tensor.copy_(wire)
        return tensor

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:  # pragma: no cover - a peer already gone; nothing left to release
                pass


def resolve_backend(configured: str, device: torch.device) -> str:
    if configured != "auto":
        return configured
    return "nccl" if device.type == "cuda" else "gloo"


class BroadcastSync:
    """Trainer side: rank 0 of a group whose other rank is the engine behind ``client``."""

    name = "broadcast"

    def __init__(self, model: torch.nn.Module, client: EngineClient, *, master_address: str = "127.0.0.1",
                 master_port: int = 0, backend: str = "auto", bucket_mb: float = 512.0,
                 dtype: torch.dtype | None = None, timeout_s: float = 120.0) -> None:
        self.model = model
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self.backend = resolve_backend(backend, next(model.parameters()).device)
        self.bucket_mb = bucket_mb
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.group: WeightGroup | None = None
        self.calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-sync-http")

    def connect(self, step: int = 0) -> None:
        self.close_group()
        group_name = f"posttrain-weights-{uuid.uuid4().hex[:8]}"
        try:
            store = master_store(self.master_address, self.master_port, 2, self.timeout_s)
        except (RuntimeError, dist.DistError) as exc:
            raise SyncError(f"Weight sync (broadcast): cannot listen on {self.master_address}:{self.master_port} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Set "
                            "sync.master_address to an address of this machine, and sync.master_port to a free "
                            "port or 0 (any).") from None
        port = store.port
        joined = self.calls.submit(self.client.init_weights_update_group, self.master_address, port, 1, 2,
                                   group_name, self.backend)
        try:
            self.group = WeightGroup(self.master_address, port, 0, 2, group_name, self.backend, self.timeout_s,
                                     store=store)
        except (RuntimeError, dist.DistError) as exc:
            reason = _http_error(joined) or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            raise SyncError(
                f"Weight sync (broadcast, step {step}): the engine at {self.client.base_url} (rank 1) did not join "
                f"the {self.backend} group '{group_name}' on {self.master_address}:{port} within "
                f"{self.timeout_s:g}s ({reason}). Check that it is running and can reach this address "
                "(sync.master_address), or raise sync.collective_timeout_s."
            ) from None
        joined.result(timeout=self.timeout_s)
        logger.info("weight sync: %s group '%s' with %s formed", self.backend, group_name, self.client.base_url)

    def push(self, version: int, step: int) -> int:
        if self.group is None:
            self.connect(step)
        assert self.group is not None
        group_name = self.group.group_name
        buckets = list(iter_weight_buckets(self.model, self.bucket_mb, self.dtype))
        sent = 0
        for i, bucket in enumerate(buckets):
            last = i == len(buckets) - 1
            announced = self.calls.submit(
                self.client.update_weights_from_distributed,
                [n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket],
                group_name, flush_cache=last, weight_version=str(version) if last else None,
            )
            for name, tensor in bucket:
                try:
                    self.group.broadcast(tensor.contiguous())
                except (RuntimeError, dist.DistError) as exc:
                    reason = _http_error(announced) or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    self.close_group()
                    raise SyncError(
                        f"Weight sync (broadcast, step {step}): sending '{name}' to the engine at "
                        f"{self.client.base_url} (rank 1 of group '{group_name}') failed ({reason}). "
                        "The engine died or is stuck; see its log and restart it: the trainer syncs again when it "
                        "sees the restart."
                    ) from None
                sent += tensor.numel() * tensor.element_size()
            announced.result(timeout=self.timeout_s)
        return sent

    def close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def close(self) -> None:
        self.close_group()
        self.calls.shutdown(wait=False, cancel_futures=True)


def _http_error(future: Future) -> str | None:
    """The engine's own error, if its HTTP call already failed (a better reason than a timeout)."""
    if future.done() and future.exception() is not None:
        return str(future.exception())
    return None
