"""What the server's apps share: errors in the OpenAI error schema and reading a JSON request
body with a size bound, so that every bad input (an oversized body, malformed JSON, a value out of
range) gets a 4xx ``{"error": {"message", "type", "param", "code"}}`` and never crashes a server."""

from __future__ import annotations

import json
from typing import Any, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError


class APIError(Exception):
    """An error answered in the OpenAI error schema."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Strict(BaseModel):
    """Request schemas: unknown parameters are rejected (400) rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


async def read_json(request: Request, max_bytes: int, schema: type[BaseModel] | None = None) -> Any:
    """The parsed body (validated against ``schema`` when given). Bodies over ``max_bytes`` get 413
    without being read further; malformed JSON and schema mismatches get 400."""
    too_large = APIError(413, f"The request body is larger than the server's limit of {max_bytes} bytes.",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > max_bytes:
                raise too_large
        except ValueError:
            raise APIError(400, "Invalid Content-Length header.") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                       code="invalid_json") from None
    if schema is None:
        return data
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def install_error_handlers(app: Any) -> None:
    """Every error of a FastAPI app in the OpenAI error schema: our APIError, request validation
    (400, naming the parameter) and routing errors (404/405)."""
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
