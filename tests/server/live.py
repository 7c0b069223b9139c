"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that speak HTTP."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import httpx
import uvicorn

from ports import bound_socket, closed_port, free_port  # noqa: F401  (re-exported for the server tests)


@contextlib.contextmanager
def live_server(app, *, health_path: str = "/health", timeout_s: float = 20.0, config=uvicorn.Config) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (``http://127.0.0.1:PORT``).
    ``config``: makes the uvicorn config, e.g. ``posttrain.server.uvicorn_run.server_config``."""
    sock = bound_socket()  # uvicorn listens on it: no other process can take the port meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + health_path, timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"the test server on {url} did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
