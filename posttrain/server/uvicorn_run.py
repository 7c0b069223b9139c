"""Running an app with uvicorn: the signal that stopped it reaches the CLI, and the requests that
uvicorn answers itself, before any app sees them, get JSON errors too."""

from __future__ import annotations

import asyncio
import http
import re
import sys
from typing import Any

import uvicorn  # the serve extra: importing this module fails where uvicorn is missing, before any work

from posttrain.server.protocol import APIError, printable

# Header bytes h11 buffers while a request's head is incomplete (uvicorn's default, 16 KiB, named
# here): more, and the request gets 431. A head that arrives in one read (up to 256 KiB) is parsed
# whole; h11 has no other bound on it.
MAX_INCOMPLETE_HEAD_BYTES = 16 * 1024


def framing_error_response(exc: BaseException | None) -> bytes:
    """The whole HTTP/1.1 response to a request that could not be parsed (``exc``: h11's
    RemoteProtocolError or httptools' HttpParserError): the OpenAI error schema as JSON, with
    h11's status hint (431 for a head too large, 501 for an unsupported Transfer-Encoding)."""
    status = getattr(exc, "error_status_hint", 400)
    if status not in (400, 413, 431, 501):
        status = 400
    detail = re.sub(r"bytearray\((b['\"].*?['\"])\)", r"\1", printable(str(exc) if exc is not None else ""))
    detail = (detail[:200] + "...") if len(detail) > 200 else detail or "malformed request"
    body = APIError(status, f"Invalid HTTP request received ({detail}): its request line, headers or chunked body "
                    "are not valid HTTP/1.1, so no route saw it.", code="invalid_http_request").response().body
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def json_error_protocol(base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (``base``; default: the one ``http="auto"`` picks) with its
    plain-text "Invalid HTTP request received." 400 replaced by ``framing_error_response``. Both of
    uvicorn's implementations (h11, httptools) call ``send_400_response`` from the ``except``
    block of the parse error, which is how the error is known here."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol  # uvicorn: the optional serve extra

        base = AutoHTTPProtocol

    class JSONErrorHTTPProtocol(base):  # type: ignore[valid-type, misc]
        def send_400_response(self, msg: str) -> None:
            self.transport.write(framing_error_response(sys.exc_info()[1]))
            self.transport.close()

    if not hasattr(base, "send_400_response"):  # another uvicorn: keep its own (plain-text) answer
        return base
    JSONErrorHTTPProtocol.__name__ = f"JSONError{base.__name__}"
    return JSONErrorHTTPProtocol


def server_config(app: Any, host: str, port: int, log_level: str, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn config of every posttrain server: JSON errors for unparseable requests, no
    WebSocket support (no app has a WebSocket route; an upgrade request is answered by the app as
    plain HTTP: a JSON 404/405), the head size bound above."""
    kwargs = {"http": json_error_protocol(), "ws": "none",
              "h11_max_incomplete_event_size": MAX_INCOMPLETE_HEAD_BYTES, **kwargs}
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, **kwargs)


def run_until_signal(app: Any, host: str, port: int, log_level: str) -> None:
    """``uvicorn.run(app, ...)``, except that the KeyboardInterrupt of the signal that stopped the
    server (Ctrl-C, or SIGTERM: Terminated) is raised here once uvicorn has shut down gracefully.
    uvicorn.run swallows it, which made `docker stop` or a Kubernetes eviction look like a clean
    exit 0; the CLI turns it into exit 130 or 143 with one line on stderr."""
    server = uvicorn.Server(server_config(app, host, port, log_level))
    server.run()  # re-raises the captured signal after the shutdown: our SIGTERM handler raises Terminated
    if not server.started:  # as uvicorn.run: the port was taken, or startup failed (uvicorn logged why)
        sys.exit(3)
