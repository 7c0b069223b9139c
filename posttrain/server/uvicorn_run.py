"""Running an app with uvicorn so that the signal that stopped it reaches the CLI."""

from __future__ import annotations

import sys
from typing import Any

import uvicorn  # the serve extra: importing this module fails where uvicorn is missing, before any work


def run_until_signal(app: Any, host: str, port: int, log_level: str) -> None:
    """``uvicorn.run(app, ...)``, except that the KeyboardInterrupt of the signal that stopped the
    server (Ctrl-C, or SIGTERM: Terminated) is raised here once uvicorn has shut down gracefully.
    uvicorn.run swallows it, which made `docker stop` or a Kubernetes eviction look like a clean
    exit 0; the CLI turns it into exit 130 or 143 with one line on stderr."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run()  # re-raises the captured signal after the shutdown: our SIGTERM handler raises Terminated
    if not server.started:  # as uvicorn.run: the port was taken, or startup failed (uvicorn logged why)
        sys.exit(3)
