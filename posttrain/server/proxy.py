"""The prompt proxy: ``posttrain serve --proxy BASE_URL --prompt-config NAME``.

It applies a prompt template (posttrain/server/prompt_config.py) and forwards to any
OpenAI-compatible backend (``posttrain serve``, vLLM, SGLang, a hosted API):

- ``/v1/chat/completions`` and ``/v1/completions`` pass through with the user turn templated (the
  system prompt and few-shot turns added); streaming responses are relayed as they arrive.
- ``/generate`` takes a native data point, ``{"question": ..., "expected_answer": ..., "n": 4}``:
  every key other than the question and the sampling parameters is metadata for the environment.
  It returns the backend's completions and, with ``--env``, their scores.
- ``--dry-run``: no backend is called; every request prints its formatted prompt and answers with it.

Errors of the backend come back with its status and its OpenAI error body; an unreachable backend
gives 502 and one that does not answer in time 504, each naming the backend's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any, Optional, Union

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field
from starlette.background import BackgroundTask

from posttrain.envs.base import Environment
from posttrain.envs.registry import resolve_env_class
from posttrain.errors import PosttrainError
from posttrain.server.prompt_config import PromptConfig, load_prompt_config
from posttrain.server.protocol import APIError, _Strict, install_error_handlers, read_json

logger = logging.getLogger("posttrain.proxy")

SAMPLING_KEYS = ("model", "n", "temperature", "top_p", "max_tokens", "stop", "seed")


class DataPoint(_Strict):
    """``POST /generate``: a question, sampling parameters, and metadata for the environment."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    question: str = Field(min_length=1)
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=1024)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None


def backend_root(url: str) -> str:
    """``http://host:8000/v1/`` -> ``http://host:8000``: routes are appended with their /v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def describe(messages_or_text: Any) -> str:
    """A formatted prompt as readable text, for --dry-run."""
    if isinstance(messages_or_text, str):
        return messages_or_text
    return "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages_or_text)


def create_proxy_app(backend_url: str | None, prompts: PromptConfig, *, env: Environment | None = None,
                     dry_run: bool = False, api_key: str = "", timeout_s: float = 600.0,
                     max_request_bytes: int = 1 << 20, env_timeout_s: float = 30.0,
                     max_connections: int = 64) -> FastAPI:
    """The proxy app. ``backend_url`` may be None only with ``dry_run``. ``env`` scores /generate
    completions (its ``required_metadata`` must be in the data point)."""
    if backend_url is None and not dry_run:
        raise ValueError("backend_url is required unless dry_run")
    root = backend_root(backend_url) if backend_url else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = httpx.AsyncClient(base_url=root or "http://unused", headers=headers, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=max_connections))
    default_model: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await http.aclose()

    app = FastAPI(title="posttrain prompt proxy", lifespan=lifespan, docs_url=None, redoc_url=None)

    install_error_handlers(app)

    def transport_error(exc: httpx.TransportError) -> APIError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return APIError(504, f"The backend at {root} did not answer within {timeout_s:g} s.", type="server_error",
                            code="backend_timeout")
        return APIError(502, f"The backend at {root} is unreachable ({type(exc).__name__}: {exc}). Check that it "
                        "runs and that --proxy points at it.", type="server_error", code="backend_unreachable")

    def backend_error(resp: httpx.Response) -> Response:
        """The backend's error as it sent it when it is in the OpenAI schema, else wrapped in it."""
        try:
            body = resp.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                return JSONResponse(body, status_code=resp.status_code)
        except ValueError:
            pass
        return APIError(resp.status_code, f"The backend at {root} answered HTTP {resp.status_code}: {resp.text[:500]}",
                        type="server_error" if resp.status_code >= 500 else "invalid_request_error",
                        code="backend_error").response()

    def backend_json(resp: httpx.Response) -> dict[str, Any]:
        """A successful backend answer as a JSON object; anything else is the backend's fault (502)."""
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise APIError(502, f"The backend at {root} answered HTTP {resp.status_code} with something other than a "
                           f"JSON object: {resp.text[:200]!r}. Is --proxy an OpenAI-compatible server?",
                           type="server_error", code="backend_error")
        return data

    async def forward(path: str, body: dict[str, Any]) -> Response:
        if body.get("stream"):
            request = http.build_request("POST", path, json=body)
            try:
                resp = await http.send(request, stream=True)
            except httpx.TransportError as exc:
                raise transport_error(exc) from None
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
                return backend_error(resp)
            return StreamingResponse(resp.aiter_bytes(), status_code=resp.status_code,
                                     media_type=resp.headers.get("content-type", "text/event-stream"),
                                     background=BackgroundTask(resp.aclose))
        try:
            resp = await http.post(path, json=body)
        except httpx.TransportError as exc:
            raise transport_error(exc) from None
        if resp.status_code >= 400:
            return backend_error(resp)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    def show(what: str, formatted: Any) -> None:
        print(f"--- {what} (dry run, prompt config '{prompts.name}')\n{describe(formatted)}", file=sys.stdout, flush=True)

    async def read_object(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_request_bytes)
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": root, "prompt_config": prompts.name, "dry_run": dry_run}

    @app.get("/v1/models")
    async def models() -> Response:
        if dry_run:
            return JSONResponse({"object": "list", "data": []})
        try:
            resp = await http.get("/v1/models")
        except httpx.TransportError as exc:
            raise transport_error(exc) from None
        return backend_error(resp) if resp.status_code >= 400 else JSONResponse(backend_json(resp))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_object(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of message objects.", param="messages",
                           code="invalid_value")
        body["messages"] = prompts.chat_messages(messages)
        if dry_run:
            show("chat", body["messages"])
            return JSONResponse({"dry_run": True, "messages": body["messages"]})
        return await forward("/v1/chat/completions", body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_object(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = prompts.text_prompt(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            body["prompt"] = [prompts.text_prompt(p) for p in prompt]
        elif not (isinstance(prompt, list) and prompt):  # token-id prompts pass through untouched
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids.", param="prompt",
                           code="invalid_value")
        if dry_run:
            for p in body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]:
                show("completion", p if isinstance(p, str) else f"(token ids) {p}")
            return JSONResponse({"dry_run": True, "prompt": body["prompt"]})
        return await forward("/v1/completions", body)

    async def model_name() -> str:
        if "name" not in default_model:
            try:
                resp = await http.get("/v1/models")
            except httpx.TransportError as exc:
                raise transport_error(exc) from None
            listed = backend_json(resp).get("data") if resp.status_code == 200 else None
            if not (isinstance(listed, list) and listed and isinstance(listed[0], dict)
                    and isinstance(listed[0].get("id"), str)):
                raise APIError(502, f"The backend at {root} lists no model at /v1/models; give 'model' in the request.",
                               type="server_error", code="backend_error")
            default_model["name"] = listed[0]["id"]
        return default_model["name"]

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        point: DataPoint = await read_json(request, max_request_bytes, DataPoint)
        metadata = dict(point.model_extra or {})
        messages = prompts.chat_messages([{"role": "user", "content": point.question}])
        if env is not None:
            missing = [k for k in env.required_metadata if metadata.get(k) is None]
            if missing:
                raise APIError(400, f"The environment needs {missing} in the data point, e.g. "
                               f"{{\"question\": ..., \"{missing[0]}\": ...}}.", param=missing[0],
                               code="missing_required_parameter")
        if dry_run:
            show("generate", messages)
            return JSONResponse({"dry_run": True, "messages": messages, "metadata": metadata})
        body = {k: getattr(point, k) for k in SAMPLING_KEYS if getattr(point, k) is not None}
        body["model"] = point.model or await model_name()
        body["messages"] = messages
        try:
            resp = await http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise transport_error(exc) from None
        if resp.status_code >= 400:
            return backend_error(resp)
        out = backend_json(resp)
        choices = out.get("choices")
        if not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
            raise APIError(502, f"The backend at {root} answered without a list of choices.", type="server_error",
                           code="backend_error")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
        messages_out = [c.get("message") if isinstance(c.get("message"), dict) else {} for c in choices]
        texts = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages_out]
        result: dict[str, Any] = {"messages": messages, "completions": texts,
                                  "finish_reasons": [c.get("finish_reason") for c in choices], "usage": out.get("usage")}
        if env is not None:
            logs = [messages + [{"role": "assistant", "content": t}] for t in texts]
            try:
                scored = await asyncio.wait_for(asyncio.to_thread(env.step, logs, [dict(metadata) for _ in texts]),
                                                env_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(504, f"The environment did not score within {env_timeout_s:g} s.", type="server_error",
                               code="env_timeout") from None
            except Exception as exc:  # the environment's own bug: report it, keep serving
                logger.exception("environment failed")
                raise APIError(500, f"The environment failed: {type(exc).__name__}: {exc}", type="server_error",
                               code="env_error") from None
            result["scores"] = scored.rewards.tolist()
            result["answers"] = scored.answers
        return JSONResponse(result)

    return app


def serve_proxy(args: Any) -> int:
    """``posttrain serve --proxy URL --prompt-config NAME [--env NAME] [--dry-run]``."""
    from posttrain.server.uvicorn_run import run_until_signal  # uvicorn (optional, serve extra) only now

    try:
        if not args.prompt_config:
            raise PosttrainError("--proxy needs --prompt-config NAME (a preset: math, gsm8k, plain; or a YAML file).")
        if not args.proxy and not args.dry_run:
            raise PosttrainError("--prompt-config needs --proxy BASE_URL (the backend), or --dry-run.")
        prompts = load_prompt_config(args.prompt_config)
        env = resolve_env_class(args.env)() if args.env else None
    except PosttrainError as exc:
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 2
    app = create_proxy_app(args.proxy or None, prompts, env=env, dry_run=args.dry_run,
                           max_request_bytes=args.max_request_bytes)
    logger.info("prompt proxy on http://%s:%d -> %s (prompt config %s%s)", args.host, args.port,
                args.proxy or "no backend", prompts.name, ", dry run" if args.dry_run else "")
    run_until_signal(app, args.host, args.port, log_level="info")  # Ctrl-C/SIGTERM: exit 130/143
    return 0
