"""Joining or starting Ray (``cluster.backend=ray``), and what Ray knows about a dead actor.

Kept apart from the replica pool so that the rest of posttrain never imports Ray: it is an
optional dependency (``pip install 'posttrain[ray]'``).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.cluster")


def import_ray() -> Any:
    try:
        import ray  # optional: the ray extra
    except ImportError:
        raise PosttrainError(
            "cluster.backend=ray needs Ray, which is not installed: `pip install 'posttrain[ray]'` (or `pip install "
            "ray`), or use cluster.backend=local."
        ) from None
    return ray


def init_ray(cluster: Any) -> bool:
    """Connect this process to Ray as ``cluster`` (a ``ClusterConfig``) says: a local instance
    when ``cluster.address`` is empty, else the cluster at that address ('auto', 'ray://host:port').
    Returns whether this call started the connection (so its owner shuts it down); a process
    already connected (a test, a driver script) keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": cluster.namespace, "log_to_driver": False, "logging_level": logging.WARNING}
    if cluster.address:
        kwargs["address"] = cluster.address
        where = f"the Ray cluster at cluster.address={cluster.address}"
    else:
        # A local instance needs no token; without this Ray 2.5x writes one under the home folder.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs["include_dashboard"] = False
        if cluster.num_cpus > 0:
            kwargs["num_cpus"] = cluster.num_cpus
        where = "a local Ray instance"
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        fix = ("Start it with `ray start --head` on this node (address=auto), check the host and port of a ray:// "
               "address and that this machine can reach it, or leave cluster.address empty for a local instance."
               if cluster.address else "Check `ray status` and free memory in /dev/shm and /tmp, or set cluster.num_cpus.")
        raise PosttrainError(f"Could not connect to {where}: {type(exc).__name__}: {_first_line(exc)}. {fix}") from None
    logger.info("Ray: connected to %s (namespace %s)", where, cluster.namespace)
    return True


def death_report(exc: BaseException, pid: int | None, actor_id: str | None, lines: int = 10) -> str:
    """Why an actor died, for an error message: Ray's own cause (worker exit type and detail, which
    name OOM kills, exit codes and signals) and the last ``lines`` lines of the actor's stderr."""
    cause = " ".join(str(exc).split())
    marker = "The actor is dead because"
    if marker in cause:  # Ray's text starts with the actor's table (class, id, pid, ...) we already name
        cause = cause[cause.index(marker):]
    tail = stderr_tail(pid, actor_id, lines)
    return f"{type(exc).__name__}: {cause}" + (f"\nLast lines of its stderr:\n{tail}" if tail else "")


def stderr_tail(pid: int | None, actor_id: str | None, lines: int = 10) -> str:
    """The end of a worker's stderr log: from this node's session log folder (a local instance or
    a replica on the head node), else through Ray's state API (needs the dashboard); '' if neither."""
    ray = import_ray()
    if pid is not None:
        try:
            logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
        except AttributeError:  # Ray Client: no local node
            logs_dir = None
        for path in sorted(glob.glob(os.path.join(logs_dir, f"worker-*-{pid}.err"))) if logs_dir else []:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
    if actor_id is not None:
        try:
            from ray.util.state import get_log  # optional: the ray extra

            return "".join(get_log(actor_id=actor_id, suffix="err", tail=lines, timeout=5)).rstrip()
        except Exception:  # noqa: BLE001 - no dashboard or the node is gone: the cause alone must do
            return ""
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)
