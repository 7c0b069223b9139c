"""What the server's apps share: errors in the OpenAI error schema and reading a JSON request
body with a size and time bound, so that every bad input (an oversized or stalled body, malformed
JSON, a value out of range) gets a 4xx ``{"error": {"message", "type", "param", "code"}}`` and
never crashes a server. ``install_error_handlers`` makes every other failure of an app a JSON 500
in the same schema (logged with its traceback on the server), never a plain-text traceback.

Bodies are read as JSON whatever their Content-Type says (``curl -d`` sends
``application/x-www-form-urlencoded``); one that is not JSON gets 400 ``invalid_json``. Before any
schema sees the body, ``check_json_values`` rejects what JSON can carry but nothing downstream can
use: text with lone surrogates (``"\\ud800"``, not encodable as UTF-8), integers beyond 64 bits,
non-finite numbers and nesting deeper than ``MAX_JSON_DEPTH``, each with a 400 that names the field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect

logger = logging.getLogger("posttrain.server")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BODY_TIMEOUT_S = 30.0  # a client that announces a body and stops sending gets 408
MAX_JSON_DEPTH = 64  # deeper bodies parse, but their answers (a rollout-API batch) could not be serialized


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) escaped, so a response that
    quotes user input can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered in the OpenAI error schema. 429 and 503 carry ``Retry-After``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None) -> None:
        message = printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = None if param is None else printable(param)
        self.code = code
        self.retry_after_s = retry_after_s if retry_after_s is not None else (1 if status in (429, 503) else None)

    def response(self) -> JSONResponse:
        headers = None if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Strict(BaseModel):
    """Request schemas: unknown parameters are rejected (400) rather than silently ignored, and
    types are not coerced (``"5"`` is not an integer, ``true`` is not 1, ``2.0`` is not ``n``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: Sequence[Any]) -> str | None:
    """The parameter a pydantic error is about, e.g. ``messages[0].role``; union-branch tags
    (``str``, ``list[str]``) that pydantic adds to locations are left out."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            param += ("." if param else "") + part
        else:
            break
    return param or None


def _validation_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    param = _param_of(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if err.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if param is None:
        return APIError(400, f"Invalid request body: {err.get('msg')}.")
    return APIError(400, f"Invalid value for '{param}': {err.get('msg')}.", param=param, code="invalid_value")


def check_json_values(data: Any) -> None:
    """Raise a 400 naming the field for a value of parsed JSON that the servers cannot use: text
    that is not valid Unicode (a lone surrogate), an integer outside 64 bits, a non-finite number
    (``1e999`` parses as infinity), nesting deeper than ``MAX_JSON_DEPTH`` (it was accepted, then
    every answer that held it failed to serialize). Iterative, and a field's name is spelled out
    only for the error, so a large body of token ids costs one pass."""
    stack: list[tuple[Any, Any, int]] = [(data, None, 0)]  # (container, where, depth); where: (parent, key)
    if not isinstance(data, (dict, list)):
        _check_scalar(data, None)
        return
    while stack:
        container, where, depth = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            raise APIError(400, f"Invalid value for '{_name(where)}': nested more than {MAX_JSON_DEPTH} levels deep.",
                           param=_param(where), code="invalid_value")
        if isinstance(container, list) and _all_usable_numbers(container):
            continue
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(key, str):
                _check_scalar(key, where)  # a key is named by the object that holds it
            if isinstance(item, (dict, list)):
                stack.append((item, (where, key), depth + 1))
            elif not (type(item) is int and INT64_MIN <= item <= INT64_MAX):  # the common case, fast
                _check_scalar(item, (where, key))


def _all_usable_numbers(values: list) -> bool:
    """True when ``values`` holds only numbers within 64 bits (so finite) and no NaN: in C loops,
    so a 50 MB body of token ids and logprobs is checked in well under a second. False means
    "look item by item" (other types, or a culprit to name)."""
    try:
        return INT64_MIN <= min(values) and max(values) <= INT64_MAX and not any(map(math.isnan, values))
    except (TypeError, ValueError, OverflowError):  # not all numbers, or empty
        return not values


def _check_scalar(value: Any, where: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"Invalid value for '{_name(where)}': the text is not valid Unicode (it holds a lone "
                           "surrogate such as \\ud800, which has no UTF-8 encoding). Send UTF-8 text.",
                           param=_param(where), code="invalid_value") from None
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise APIError(400, f"Invalid value for '{_name(where)}': {value} does not fit in 64 bits (integers must "
                           f"be between {INT64_MIN} and {INT64_MAX}).", param=_param(where), code="invalid_value")
    elif isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"Invalid value for '{_name(where)}': numbers must be finite, got {value}.",
                       param=_param(where), code="invalid_value")


def _param(where: Any) -> str | None:
    """``(((None, "messages"), 0), "content")`` -> ``messages[0].content``."""
    parts = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".") or None


def _name(where: Any) -> str:
    return _param(where) or "body"


async def _read_body(request: Request, max_bytes: int, too_large: APIError) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


async def read_json(request: Request, max_bytes: int, schema: type[BaseModel] | None = None, *,
                    timeout_s: float | None = None) -> Any:
    """The parsed body (validated against ``schema`` when given). Bodies over ``max_bytes`` get 413
    without being read further, a body that does not arrive within ``timeout_s`` (default
    ``BODY_TIMEOUT_S``) gets 408, and malformed JSON, unusable values (``check_json_values``) and
    schema mismatches get 400."""
    timeout_s = BODY_TIMEOUT_S if timeout_s is None else timeout_s
    too_large = APIError(413, f"The request body is larger than the server's limit of {max_bytes} bytes.",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > max_bytes:
                raise too_large
        except ValueError:
            raise APIError(400, "Invalid Content-Length header.") from None
    try:
        body = await asyncio.wait_for(_read_body(request, max_bytes, too_large), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g} s (a Content-Length larger "
                       "than the body sent?).", code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "The client disconnected before sending the whole body.") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        said = f" (Content-Type: {kind})" if kind and "json" not in kind else ""
        raise APIError(400, f"We could not parse the JSON body of your request{said}: it is not valid JSON. The "
                       "body must be a JSON object.", code="invalid_json") from None
    check_json_values(data)
    if schema is None:
        return data
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


class JSONErrorMiddleware:
    """ASGI middleware: an exception that no handler turned into a response becomes a JSON 500 in
    the OpenAI schema (and is logged here with its traceback). If the response has already
    begun (a stream), the exception goes on to the server, which closes the connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            first_line = (str(exc).splitlines() or [""])[0][:200]
            error = APIError(500, f"The server failed: {type(exc).__name__}: {first_line} (see the server log).",
                             type="server_error", code="internal_error")
            await error.response()(scope, receive, send)


def install_error_handlers(app: Any) -> None:
    """Every error of a FastAPI app in the OpenAI error schema: our APIError, request validation
    (400, naming the parameter), routing errors (404/405) and, through ``JSONErrorMiddleware``,
    anything else (500)."""
    # fastapi/starlette: the optional serve extra, present wherever an app is built
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = (exc.errors() or [{}])[0]
        param = _param_of(err.get("loc", ())[1:])
        return APIError(400, f"Invalid request: {err.get('msg', 'validation failed')}.", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type=kind).response()

    app.add_middleware(JSONErrorMiddleware)
