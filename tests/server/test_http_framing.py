"""Requests as raw bytes over a socket (issue 32): every error a client can get back, including
those for requests uvicorn rejects before any app sees them (bad framing: a malformed request
line, header or chunk, a wrong Content-Length, an unsupported Transfer-Encoding, a head too
large), is JSON in the OpenAI error schema (docs/server.md), not uvicorn's plain text."""

from __future__ import annotations

import json
import re
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from posttrain.server.group_queue import GroupQueue
from posttrain.server.prompt_config import load_prompt_config
from posttrain.server.proxy import create_proxy_app
from posttrain.server.rollout_api import create_rollout_api_app
from posttrain.server.uvicorn_run import MAX_INCOMPLETE_HEAD_BYTES, server_config
from server.live import live_server


@pytest.fixture(scope="module", params=["rollout-api", "proxy"])
def server(request):
    app = create_rollout_api_app(GroupQueue(max_groups=8, max_staleness=1)) if request.param == "rollout-api" \
        else create_proxy_app(None, load_prompt_config("plain"), dry_run=True)
    with live_server(app, config=server_config) as url:
        yield request.param, int(url.rsplit(":", 1)[1])


def exchange(port: int, *pieces: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``pieces`` (one send each) and read one response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    match = re.search(rb"\r\ncontent-length: *(\d+)", data.partition(b"\r\n\r\n")[0], re.IGNORECASE)
    return int(match.group(1)) if match else 1 << 30


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    got, headers, body = response
    assert got == status, (got, headers, body)
    assert headers["content-type"] == "application/json", (headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("raw, status, fragment", [
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "illegal chunk header"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400, "bad Content-Length"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "Content-Length"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS to a plain port\r\n\r\n", 400, "illegal request line"),
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "Missing mandatory Host: header"),
    (b"GET /health HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", 400, "illegal header line"),
    (b"GET /health HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n", 400, "illegal header line"),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "Transfer-Encoding: chunked"),
])
def test_framing_errors_uvicorn_answers_itself_are_json(server, raw, status, fragment):
    error = assert_json_error(exchange(server[1], raw), status, "invalid_http_request")
    assert fragment in error["message"] and "Invalid HTTP request received" in error["message"]


def test_a_head_larger_than_the_bound_gets_431_json(server):
    head = b"GET /health HTTP/1.1\r\nHost: a\r\nX-Filler: " + b"a" * (4 * MAX_INCOMPLETE_HEAD_BYTES)
    pieces = [head[i:i + 8192] for i in range(0, len(head), 8192)]  # as a slow client sends it
    assert_json_error(exchange(server[1], *pieces), 431, "invalid_http_request")


def test_a_bad_chunk_after_the_app_started_reading_the_body_is_json(server):
    path = b"/groups" if server[0] == "rollout-api" else b"/generate"
    start = b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n"
    assert_json_error(exchange(server[1], start, b"nothex\r\n"), 400, "invalid_http_request")


def test_errors_the_app_answers_are_json_over_the_wire(server):
    name, port = server
    post = b"/register" if name == "rollout-api" else b"/generate"

    def request(method: bytes, path: bytes, body: bytes = b"", *headers: bytes) -> tuple:
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: a", *headers]
        if (body or method == b"POST") and not any(h.lower().startswith(b"content-length") for h in headers):
            lines.append(b"Content-Length: %d" % len(body))
        return exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)

    assert_json_error(request(b"POST", post, b"{not json"), 400, "invalid_json")
    error = assert_json_error(request(b"POST", post, b"a=b", b"Content-Type: application/x-www-form-urlencoded"), 400)
    assert "x-www-form-urlencoded" in error["message"]
    assert_json_error(request(b"POST", post, b"[1, 2]"), 400)
    assert_json_error(request(b"GET", b"/no/such/path"), 404)
    assert_json_error(request(b"DELETE", post), 405)
    assert_json_error(request(b"POST", post, b"", b"Content-Length: 99999999999"), 413, "request_too_large")
    big = b"x" * ((1 << 20) + 1 if name == "proxy" else (64 << 20) + 1)  # one byte over each limit
    chunked = b"POST " + post + b" HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert_json_error(exchange(port, chunked, b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"), 413, "request_too_large")
    # A WebSocket upgrade is served as plain HTTP (no app has a WebSocket route).
    status, headers, _body = request(b"GET", b"/health", b"", b"Connection: Upgrade", b"Upgrade: websocket",
                                    b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    assert status == 200 and headers["content-type"] == "application/json"
    if name == "rollout-api":
        assert_json_error(request(b"GET", b"/batch?size=abc"), 400)


def test_the_server_serves_after_the_framing_errors(server):
    status, _headers, body = exchange(server[1], b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and json.loads(body)


def test_the_cli_servers_run_with_this_config(monkeypatch):
    import uvicorn

    from posttrain.server import uvicorn_run

    seen = {}

    class Stop(Exception):
        pass

    class FakeServer:
        def __init__(self, config):
            seen["config"] = config

        def run(self):
            raise Stop

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    with pytest.raises(Stop):
        uvicorn_run.run_until_signal(object(), "127.0.0.1", 1, "warning")
    config = seen["config"]
    assert config.http.__name__.startswith("JSONError") and config.ws == "none"
    assert config.h11_max_incomplete_event_size == MAX_INCOMPLETE_HEAD_BYTES


def test_any_uvicorn_protocol_that_answers_from_its_except_block_gets_json():
    """httptools (uvicorn[standard]) is not installed here: a protocol shaped like its
    HttpToolsProtocol (send_400_response called in the `except HttpParserError` block)."""
    from posttrain.server.uvicorn_run import json_error_protocol

    class ParserError(Exception):
        pass

    class Transport:
        written, closed = b"", False

        def write(self, data):
            self.written += data

        def close(self):
            self.closed = True

    class HttpToolsLike:
        def __init__(self):
            self.transport = Transport()

        def data_received(self, data):
            try:
                raise ParserError("Invalid method encountered")
            except ParserError:
                self.send_400_response("Invalid HTTP request received.")

        def send_400_response(self, msg):
            self.transport.write(msg.encode())

    protocol = json_error_protocol(HttpToolsLike)()
    protocol.data_received(b"\x00")
    head, _, body = protocol.transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"content-type: application/json" in head
    assert b"content-length: %d" % len(body) in head and protocol.transport.closed
    assert json.loads(body)["error"]["message"].startswith("Invalid HTTP request received (Invalid method encountered)")
    assert json_error_protocol(object) is object  # a protocol without that hook is left as it is
