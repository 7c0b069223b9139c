"""``posttrain grpo trainer.num_processes=N``: start N worker processes of the same command on this
machine through torch's elastic launch API (what ``torchrun --standalone --nproc-per-node N`` does),
wait for them, and return their exit code."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

logger = logging.getLogger("posttrain.distributed")


def relaunch(num_processes: int, argv: Sequence[str], shutdown_timeout_s: float = 1800.0) -> int:
    """Run ``python -m posttrain.cli ARGV`` in ``num_processes`` workers (ranks 0..N-1, one rendezvous
    on a free local port). Returns 0 when all succeed, else the exit code of the first failed rank
    (2: config error, 130: interrupted: Ctrl-C reaches every worker, which checkpoints its last whole
    step). Workers inherit the environment; torchrun sets
    OMP_NUM_THREADS=1 in them unless it is set. ``shutdown_timeout_s``: how long workers may take to
    finish their step and checkpoint after Ctrl-C before they are killed."""
    # torch >= 2.12 takes the grace period after a signal as a field; older versions read this variable.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(shutdown_timeout_s)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        run_id=f"posttrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,  # a failed rank fails the run: a restart would repeat steps without resuming
        monitor_interval=1,
    )
    logger.info("Starting %d training processes (torch.distributed elastic launch)", num_processes)
    # The launcher installs its own signal handlers and leaves them behind; put ours back after it.
    handled = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT) if s is not None]
    previous = {s: signal.getsignal(s) for s in handled}
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "posttrain.cli", *argv)
    except ChildFailedError as exc:
        first = min(exc.failures.values(), key=lambda failure: failure.timestamp)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as exc:
        # Ctrl-C (or SIGTERM): the launcher has passed the signal on to the workers and waited for
        # them; they finished their update and saved a checkpoint of the last whole step.
        logger.warning("Stopped by signal %s; the workers have exited.", exc.sigval)
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    return 0
