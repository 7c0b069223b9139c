"""The process group of a multi-process run: set-up from torchrun's environment, rank helpers,
and the few reductions the trainer needs (sums of counts, means of metrics)."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from posttrain.errors import PosttrainError

# torchrun (torch.distributed.run) sets these for every worker process.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a worker process started by torchrun or the elastic launch API."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that logs, writes metrics and shows progress."""
    return get_rank() == 0


def init_process_group(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group torchrun described in the environment (``env://``) and return this
    rank's device: ``cuda:LOCAL_RANK`` with NCCL on GPUs, the CPU with gloo otherwise.

    A no-op returning ``device`` outside torchrun or with a world size of 1. ``timeout_s`` bounds
    every collective: rank 0 alone runs validation and checkpoint bookkeeping while the others wait
    in the next collective, so it must exceed the longest of those."""
    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise PosttrainError("This torch build has no torch.distributed; run with trainer.num_processes=1.")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PosttrainError(
                f"Process {local_rank} has no GPU: {torch.cuda.device_count()} visible for "
                f"{os.environ['WORLD_SIZE']} processes. Set trainer.num_processes (or --nproc-per-node) "
                "to at most the number of GPUs."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return device


def destroy_process_group() -> None:
    """Leave the process group (end of a run, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a list of numbers (float64, exact for counts)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the run folder, named from rank 0's clock)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that have it. Metrics already global (equal on every
    rank) stay as they are; per-rank ones (e.g. time spent) become their mean."""
    if not is_distributed():
        return metrics
    per_rank = all_gather_objects(metrics)
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    return {k: sum(m[k] for m in per_rank if k in m) / sum(k in m for m in per_rank) for k in keys}


def barrier() -> None:
    if is_distributed():
        dist.barrier()
