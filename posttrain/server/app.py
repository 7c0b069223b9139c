"""An OpenAI-compatible server over any ``RolloutEngine``.

Endpoints: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` and ``POST /generate`` (token ids in, token ids and logprobs out, for RL
clients). See docs/server.md for parameters, limits and examples.

Design notes:
- ``stream: true`` over posttrain's ``Engine`` sends tokens as the engine loop produces them
  (``streaming.live_chunks``; text that a stop string could still cut is held back until the choice ends);
  an error once the stream has begun comes as an error event before ``[DONE]``. Other engines
  return whole completions, so their stream is sent after generation has finished.
- posttrain's ``Engine`` is stepped by one background thread (``engine_loop``): concurrent
  requests join one continuously batched run. Other engines (HFEngine, not re-entrant) run one
  call at a time on a single worker thread, under a lock. Either way at most ``max_queue + 1``
  requests are admitted at once; more get 429.
- Every wait is bounded. A request that arrives while generation is paused (``/pause_generation``)
  waits up to ``paused_wait_s`` for ``/continue_generation``, then gets 503 with ``Retry-After``;
  a request that has not finished within ``request_timeout_s`` gets 504 and its sequences are
  aborted. ``/health`` answers 200 only when a request would be served now (see docs/server.md).
- Request bodies are read and validated by ``protocol.read_json`` and the schemas in ``requests.py``
  (not by FastAPI's body parsing), so that every bad input, from an oversized body to malformed
  JSON to an out-of-range parameter, gets a 4xx in the OpenAI error schema
  ``{"error": {"message", "type", "param", "code"}}``.
- Request-side tokenization uses a private copy of the tokenizer: a fast tokenizer may refuse
  to be used from two threads at once ("Already borrowed"), and the engine decodes on its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from posttrain.errors import PosttrainError
from posttrain.sampling import Completion, RolloutEngine, SamplingParams
from posttrain.server.engine_loop import EngineLoop, GenerationPaused, TokenStream
from posttrain.server.metrics import add_metrics
from posttrain.server.protocol import APIError, install_error_handlers, read_json
from posttrain.server.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    chat_prompt_ids,
    completion_prompt_ids,
)
from posttrain.server.responses import chat_logprobs, completion_logprobs, usage_counts
from posttrain.server.streaming import StreamedChoice, cut_at_stops, live_chunks, sse_response
from posttrain.server.weight_routes import add_weight_routes

logger = logging.getLogger("posttrain.server")

MAX_STOP_STRINGS = 4  # as in the OpenAI API
MAX_PROMPTS = 2048  # prompts in one /v1/completions request, as in the OpenAI API


class _Server:
    """The state behind the routes: engine, worker thread, limits."""

    def __init__(self, engine: RolloutEngine, tokenizer: Any, model_name: str, *, max_request_bytes: int,
                 max_prompt_tokens: int, max_queue: int, max_n: int, max_tokens_limit: int,
                 default_max_tokens: int, paused_wait_s: float, request_timeout_s: float) -> None:
        for name, value, low in [("max_request_bytes", max_request_bytes, 1), ("max_prompt_tokens", max_prompt_tokens, 1),
                                 ("max_queue", max_queue, 0), ("max_n", max_n, 1), ("max_tokens_limit", max_tokens_limit, 1),
                                 ("default_max_tokens", default_max_tokens, 1), ("paused_wait_s", paused_wait_s, 0),
                                 ("request_timeout_s", request_timeout_s, 1)]:
            if not value >= low:  # NaN too
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= {low}, got {value}")
        self.engine = engine
        try:
            self.tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # pragma: no cover - a tokenizer that cannot be copied is used as is
            self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.max_prompt_tokens = max_prompt_tokens
        self.max_queue = max_queue
        self.max_n = max_n
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.created = int(time.time())
        self.vocab_size = len(self.tokenizer)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-engine")
        self.engine_lock = threading.Lock()
        # An engine that steps (posttrain's) is owned by a loop thread that batches all requests.
        self.engine_loop = EngineLoop(engine) if hasattr(engine, "step") and hasattr(engine, "add_request") else None
        if self.engine_loop is not None:  # leave room for at least one completion token
            self.max_prompt_tokens = min(self.max_prompt_tokens, engine.max_model_len - 1)
        self._count_lock = threading.Lock()
        self.admitted = 0  # running + waiting engine calls
        self.paused_wait_s = paused_wait_s
        self.request_timeout_s = request_timeout_s
        self.paused = threading.Event()  # set by /pause_generation, cleared by /continue_generation
        self.activity: tuple[str, float] | None = None  # (weight-route name, time.monotonic() it began)
        # The transformers engine's share of what /metrics reports (the engine loop counts its own).
        self.hf_running_sequences = 0
        self.hf_generated_tokens = 0

    # -- request bodies ----------------------------------------------------------------------

    async def read_json(self, request: Request, schema: type[BaseModel]) -> Any:
        return await read_json(request, self.max_request_bytes, schema)

    # -- sampling parameters -----------------------------------------------------------------

    def sampling_params(self, *, n: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
                        max_tokens: int | None, max_tokens_param: str, stop: str | list[str] | None,
                        seed: int | None, logprobs: bool, prefix: str = "") -> SamplingParams:
        """The engine's parameters, after the checks that depend on this server's limits (types and
        fixed ranges are the schemas' job). ``prefix`` names nested parameters (``sampling_params.``)."""
        n = 1 if n is None else n
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"Invalid value for '{prefix}n': must be between 1 and {self.max_n}, got {n}.",
                           param=f"{prefix}n", code="invalid_value")
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"Invalid value for '{max_tokens_param}': must be between 1 and "
                           f"{self.max_tokens_limit}, got {max_tokens}.", param=max_tokens_param, code="invalid_value")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"Invalid value for '{prefix}stop': at most {MAX_STOP_STRINGS} stop strings, got "
                           f"{len(stops)}.", param=f"{prefix}stop", code="invalid_value")
        if any(s == "" for s in stops):
            raise APIError(400, f"Invalid value for '{prefix}stop': stop strings must not be empty.",
                           param=f"{prefix}stop", code="invalid_value")
        return SamplingParams(
            n=n,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=max(top_k or 0, 0),
            max_tokens=max_tokens,
            stop=stops,
            seed=seed,
            logprobs=logprobs,
        )

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"Invalid value for '{param}': the prompt is empty (0 tokens).", param=param,
                           code="invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"The prompt has {len(ids)} tokens, more than this server's limit of "
                           f"{self.max_prompt_tokens}. Shorten the prompt.", param=param,
                           code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Invalid value for '{param}': token id {bad} is outside the vocabulary "
                           f"[0, {self.vocab_size}).", param=param, code="invalid_value")
        return ids

    # -- the engine --------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._count_lock:
            if self.admitted > self.max_queue:  # one running, max_queue waiting
                raise APIError(429, f"The server is busy: {self.max_queue} requests are already waiting. "
                               "Retry later.", type="rate_limit_error", code="queue_full")
            self.admitted += 1

    def still_paused(self) -> APIError:
        return APIError(503, f"Generation is paused (POST /pause_generation, e.g. while the trainer updates the "
                        f"weights) and did not resume within {self.paused_wait_s:g} s (--paused-wait-s). Retry later.",
                        type="server_error", code="generation_paused", retry_after_s=max(1.0, self.paused_wait_s))

    async def _wait_while_paused(self) -> None:
        """The transformers engine: queue behind a pause for at most ``paused_wait_s`` (the engine
        loop does the same for its requests, keeping them queued so that they batch on resume)."""
        deadline = time.monotonic() + self.paused_wait_s
        while self.paused.is_set():
            if time.monotonic() >= deadline:
                raise self.still_paused()
            await asyncio.sleep(0.05)

    def timed_out(self) -> APIError:
        return APIError(504, f"The request did not finish within {self.request_timeout_s:g} s (--request-timeout-s); "
                        "its generation was stopped. Ask for fewer tokens or retry later.", type="server_error",
                        code="request_timeout")

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self._admit()
        deadline = time.monotonic() + self.request_timeout_s
        try:
            if self.engine_loop is not None:
                return await asyncio.wait_for(self.engine_loop.generate(prompts, params, paused_wait_s=self.paused_wait_s),
                                              self.request_timeout_s)
            await self._wait_while_paused()
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(
                loop.run_in_executor(self.executor, self._generate_locked, prompts, params, deadline),
                self.request_timeout_s)
        except asyncio.TimeoutError:  # the engine loop aborts a cancelled request at its next step
            raise self.timed_out() from None
        except GenerationPaused:
            raise self.still_paused() from None
        except Exception as exc:
            raise _api_error(exc) from None
        finally:
            with self._count_lock:
                self.admitted -= 1

    async def open_stream(self, prompts: list[list[int]], params: SamplingParams) -> TokenStream:
        """Start a streaming request on the engine loop; returns once the engine admitted it, so a
        refused request still gets a status code. Give the stream to ``close_stream`` when done."""
        self._admit()
        stream = None
        try:
            stream = self.engine_loop.open_stream(prompts, params, deadline=time.monotonic() + self.request_timeout_s,
                                                  paused_wait_s=self.paused_wait_s)
            await stream.started()
            return stream
        except BaseException as exc:  # refused, timed out, or the handler was cancelled while waiting
            if stream is not None:
                stream.close()
            with self._count_lock:
                self.admitted -= 1
            if isinstance(exc, asyncio.TimeoutError):
                raise self.timed_out() from None
            if isinstance(exc, GenerationPaused):
                raise self.still_paused() from None
            if isinstance(exc, Exception):
                raise _api_error(exc) from None
            raise

    def close_stream(self, stream: TokenStream) -> None:
        stream.close()
        with self._count_lock:
            self.admitted -= 1

    def _generate_locked(self, prompts: list[list[int]], params: SamplingParams,
                         deadline: float) -> list[list[Completion]]:
        # Bounded: the lock may be held by /pause_generation; the handler has answered 504 by then.
        if not self.engine_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the engine stayed busy (paused?) past the request's deadline")
        try:
            self.hf_running_sequences = len(prompts) * params.n
            groups = self.engine.generate(prompts, params)
            self.hf_generated_tokens += sum(len(c.token_ids) for g in groups for c in g)
            return groups
        finally:
            self.hf_running_sequences = 0
            self.engine_lock.release()

    # -- what /health and /metrics report ------------------------------------------------------

    def queue_depth(self) -> int:
        """Admitted requests that wait: for a pause, or for the engine."""
        if self.engine_loop is not None:
            return max(0, self.admitted - self.engine_loop.num_requests_in_engine)
        return max(0, self.admitted - (1 if self.hf_running_sequences else 0))

    def num_sequences(self) -> tuple[int, int]:
        """(running, waiting) sequences in the engine."""
        if self.engine_loop is not None:
            return self.engine_loop.num_sequences()
        return self.hf_running_sequences, 0

    def generated_tokens(self) -> int:
        return self.engine_loop.num_generated_tokens if self.engine_loop is not None else self.hf_generated_tokens

    def health(self, weight_version: str, weight_groups: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /health: 200 only when a request would be served now."""
        activity = self.activity
        if self.engine_loop is not None and not self.engine_loop.is_alive:
            status = "stopped"
        elif activity is not None:
            status = "updating_weights"
        elif self.paused.is_set():
            status = "paused"
        else:
            status = "ok"
        running, waiting = self.num_sequences()
        body = {
            "status": status, "model": self.model_name, "engine": "posttrain" if self.engine_loop else "transformers",
            "requests_in_engine": self.admitted, "queue_depth": self.queue_depth(), "running_sequences": running,
            "waiting_sequences": waiting, "paused": self.paused.is_set(), "weight_version": weight_version,
            "weight_groups": weight_groups,
            "activity": None if activity is None else {"name": activity[0],
                                                       "seconds": round(time.monotonic() - activity[1], 3)},
        }
        return (200 if status == "ok" else 503), body

    # -- response pieces ---------------------------------------------------------------------

    def visible_text(self, completion: Completion, stops: list[str]) -> str:
        """The completion text as the OpenAI API returns it: without the stop string."""
        return cut_at_stops(completion.text, stops)

    def reported_tokens(self, completion: Completion) -> list[tuple[int, float]]:
        """Sampled tokens and logprobs to report, without special tokens such as EOS."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return [(t, lp) for t, lp in zip(completion.token_ids, completion.logprobs) if t not in special]

    def usage(self, prompts: list[list[int]], groups: list[list[Completion]]) -> dict[str, int]:
        return usage_counts(sum(len(p) for p in prompts), sum(len(c.token_ids) for g in groups for c in g))


def _api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PosttrainError):  # the engine refused the request (e.g. a prompt over max_model_len)
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, TimeoutError):  # a stream's or the engine lock's deadline passed
        return APIError(504, f"The request did not finish in time ({exc}).", type="server_error",
                        code="request_timeout")
    logger.exception("engine failed", exc_info=exc)
    return APIError(500, f"The engine failed: {type(exc).__name__}: {exc}", type="server_error")


def _live_sse(server: _Server, stream: TokenStream, head_chunks: list[dict[str, Any]],
              chunks: AsyncIterator[dict[str, Any]], usage: Callable[[], dict[str, Any] | None]) -> StreamingResponse:
    async def events():
        try:
            for event in head_chunks:
                yield f"data: {json.dumps(event)}\n\n"
            async for event in chunks:
                yield f"data: {json.dumps(event)}\n\n"
            last = usage()
            if last is not None:
                yield f"data: {json.dumps(last)}\n\n"
        except Exception as exc:  # the response has begun: the error comes as an event
            error = _api_error(exc)
            body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            server.close_stream(stream)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(
    engine: RolloutEngine,
    tokenizer: Any,
    model_name: str,
    *,
    max_request_bytes: int = 1 << 20,
    max_prompt_tokens: int = 4096,
    max_queue: int = 64,
    max_n: int = 64,
    max_tokens_limit: int = 4096,
    default_max_tokens: int = 256,
    enable_tensor_updates: bool = False,
    paused_wait_s: float = 30.0,
    request_timeout_s: float = 600.0,
    weight_sync_timeout_s: float = 120.0,
) -> FastAPI:
    """The FastAPI app serving ``engine`` under the name ``model_name``.

    ``tokenizer`` formats chat messages (its chat template) and turns text into token ids.
    Limits: request bodies over ``max_request_bytes`` get 413; prompts over ``max_prompt_tokens``,
    ``n`` over ``max_n`` and ``max_tokens`` over ``max_tokens_limit`` get 400; when ``max_queue``
    requests already wait for the engine, more get 429. ``default_max_tokens`` applies when a
    request gives no ``max_tokens``. The SGLang-compatible weight-update endpoints come from
    ``weight_routes``; ``enable_tensor_updates`` allows the one that unpickles its request.
    An engine that steps (posttrain's ``Engine``: ``add_request`` and ``step``) is driven by a
    background thread that batches concurrent requests (``engine_loop``); its ``max_model_len - 1``
    caps ``max_prompt_tokens``. Waits: a request queues behind ``/pause_generation`` for at most
    ``paused_wait_s`` (then 503 with Retry-After) and is answered within ``request_timeout_s``
    (else 504); joining a weight-update group gives up after ``weight_sync_timeout_s``."""
    server = _Server(engine, tokenizer, model_name, max_request_bytes=max_request_bytes,
                     max_prompt_tokens=max_prompt_tokens, max_queue=max_queue, max_n=max_n,
                     max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens,
                     paused_wait_s=paused_wait_s, request_timeout_s=request_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if server.engine_loop is not None:
            server.engine_loop.stop()
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="posttrain", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    receiver = add_weight_routes(app, server, allow_pickled_tensors=enable_tensor_updates,
                                 group_timeout_s=weight_sync_timeout_s)
    app.state.weights = receiver

    install_error_handlers(app)
    add_metrics(app, server, receiver)  # outermost: it sees the status of every answer, 500s included

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = server.health(receiver.weight_version, receiver.group_states())
        return JSONResponse(body, status_code=status)

    def model_card() -> dict[str, Any]:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "posttrain"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != server.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{server.model_name}'.",
                           type="not_found_error", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await server.read_json(request, ChatCompletionRequest)
        if req.top_logprobs:
            raise APIError(400, "'top_logprobs' is not supported: the engine returns only the logprob of each "
                           "sampled token. Use logprobs=true without top_logprobs.", param="top_logprobs",
                           code="unsupported_parameter")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "Give only one of 'max_tokens' and 'max_completion_tokens'.",
                           param="max_completion_tokens", code="invalid_value")
        use_mct = req.max_completion_tokens is not None
        params = server.sampling_params(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            max_tokens=req.max_completion_tokens if use_mct else req.max_tokens,
            max_tokens_param="max_completion_tokens" if use_mct else "max_tokens",
            stop=req.stop, seed=req.seed, logprobs=bool(req.logprobs),
        )
        prompt = server.check_prompt(chat_prompt_ids(server.tokenizer, req.messages), "messages")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream and server.engine_loop is not None:  # tokens as the engine produces them
            head = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": server.model_name, "system_fingerprint": None}
            stream = await server.open_stream([prompt], params)
            choices = [StreamedChoice(server.tokenizer, params.stop) for _ in range(params.n)]

            def chat_chunks(i: int, choice: StreamedChoice, text: str, tokens: list[tuple[int, float]]):
                chunks = []
                if text or (req.logprobs and tokens):
                    chunks.append({**head, "choices": [{
                        "index": i, "delta": {"content": text}, "finish_reason": None,
                        "logprobs": chat_logprobs(server.tokenizer, tokens) if req.logprobs else None}]})
                if choice.finish_reason is not None:
                    chunks.append({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                        "finish_reason": choice.finish_reason}]})
                return chunks

            def chat_usage():
                if not (req.stream_options and req.stream_options.include_usage):
                    return None
                return {**head, "choices": [], "usage": usage_counts(len(prompt), sum(len(c.token_ids) for c in choices))}

            roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                           "finish_reason": None}]} for i in range(params.n)]
            return _live_sse(server, stream, roles, live_chunks(stream, choices, chat_chunks), chat_usage)
        [group] = await server.generate([prompt], params)

        def logprobs_of(c: Completion) -> dict[str, Any] | None:
            return chat_logprobs(server.tokenizer, server.reported_tokens(c)) if req.logprobs else None

        texts = [server.visible_text(c, params.stop) for c in group]
        usage = server.usage([prompt], [group])
        if not req.stream:
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": server.model_name,
                "system_fingerprint": None,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs_of(c),
                     "finish_reason": c.finish_reason}
                    for i, (c, text) in enumerate(zip(group, texts))
                ],
                "usage": usage,
            }
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                "system_fingerprint": None}
        events = []
        for i, (c, text) in enumerate(zip(group, texts)):
            events.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            events.append({**head, "choices": [{"index": i, "delta": {"content": text}, "logprobs": logprobs_of(c),
                                                "finish_reason": None}]})
            events.append({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                "finish_reason": c.finish_reason}]})
        if req.stream_options and req.stream_options.include_usage:
            events.append({**head, "choices": [], "usage": usage})
        return sse_response(events)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await server.read_json(request, CompletionRequest)
        if req.logprobs:
            raise APIError(400, f"logprobs={req.logprobs} asks for the top {req.logprobs} alternatives per token, "
                           "which is not supported: the engine returns only the logprob of each sampled token. "
                           "Use logprobs=0.", param="logprobs", code="unsupported_parameter")
        if req.echo:
            raise APIError(400, "'echo' is not supported.", param="echo", code="unsupported_parameter")
        if req.suffix:
            raise APIError(400, "'suffix' is not supported.", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError(400, "'best_of' is not supported (other than equal to n).", param="best_of",
                           code="unsupported_parameter")
        params = server.sampling_params(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=req.max_tokens,
            max_tokens_param="max_tokens", stop=req.stop, seed=req.seed, logprobs=req.logprobs is not None,
        )
        if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
                and len(req.prompt) > MAX_PROMPTS:  # else a 1 MiB body could ask for 250,000 sequences at once
            raise APIError(400, f"Invalid value for 'prompt': at most {MAX_PROMPTS} prompts per request, got "
                           f"{len(req.prompt)}. Split the batch.", param="prompt", code="invalid_value")
        prompts = [server.check_prompt(ids, "prompt") for ids in completion_prompt_ids(server.tokenizer, req.prompt)]
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": completion_id, "object": "text_completion", "created": created, "model": server.model_name,
                "system_fingerprint": None}
        if req.stream and server.engine_loop is not None:  # tokens as the engine produces them
            stream = await server.open_stream(prompts, params)
            live = [StreamedChoice(server.tokenizer, params.stop) for _ in range(len(prompts) * params.n)]
            offsets = [0] * len(live)  # where each choice's next logprob token starts in its text

            def text_chunks(i: int, choice: StreamedChoice, text: str, tokens: list[tuple[int, float]]):
                if not (text or choice.finish_reason is not None or (req.logprobs is not None and tokens)):
                    return []
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(server.tokenizer, tokens, offsets[i])
                    offsets[i] += sum(len(t) for t in logprobs["tokens"])
                return [{**head, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                              "finish_reason": choice.finish_reason}]}]

            def text_usage():
                if not (req.stream_options and req.stream_options.include_usage):
                    return None
                return {**head, "choices": [], "usage": usage_counts(sum(len(p) for p in prompts),
                                                               sum(len(c.token_ids) for c in live))}

            return _live_sse(server, stream, [], live_chunks(stream, live, text_chunks), text_usage)
        groups = await server.generate(prompts, params)

        def logprobs_of(c: Completion) -> dict[str, Any] | None:
            return None if req.logprobs is None else completion_logprobs(server.tokenizer, server.reported_tokens(c))

        choices = [
            {"index": p * params.n + j, "text": server.visible_text(c, params.stop), "logprobs": logprobs_of(c),
             "finish_reason": c.finish_reason}
            for p, group in enumerate(groups) for j, c in enumerate(group)
        ]
        usage = server.usage(prompts, groups)
        if not req.stream:
            return {**head, "choices": choices, "usage": usage}
        events = [{**head, "choices": [choice]} for choice in choices]
        if req.stream_options and req.stream_options.include_usage:
            events.append({**head, "choices": [], "usage": usage})
        return sse_response(events)

    @app.post("/generate")
    async def generate(request: Request):
        req: GenerateRequest = await server.read_json(request, GenerateRequest)
        sp = req.sampling_params
        if sp.max_new_tokens is not None and sp.max_tokens is not None:
            raise APIError(400, "Give only one of 'max_new_tokens' and 'max_tokens'.",
                           param="sampling_params.max_tokens", code="invalid_value")
        use_new = sp.max_tokens is None
        params = server.sampling_params(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
            max_tokens=sp.max_new_tokens if use_new else sp.max_tokens,
            max_tokens_param="sampling_params." + ("max_new_tokens" if use_new else "max_tokens"),
            stop=sp.stop, seed=sp.seed, logprobs=sp.logprobs, prefix="sampling_params.",
        )
        prompt = server.check_prompt(list(req.input_ids), "input_ids")
        [group] = await server.generate([prompt], params)
        # meta_info as SGLang's: weight_version is the label of the weights loaded when the answer
        # left; token_versions (posttrain's) the integer version that sampled each output token, which
        # changes inside a completion when weights are updated between two decode steps.
        outputs = [
            {"output_ids": c.token_ids, "text": c.text, "logprobs": c.logprobs if sp.logprobs else None,
             "finish_reason": c.finish_reason,
             "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(c.token_ids),
                       "total_tokens": len(prompt) + len(c.token_ids)},
             "meta_info": {"weight_version": receiver.weight_version, "token_versions": c.token_versions}}
            for c in group
        ]
        return outputs[0] if params.n == 1 else outputs

    return app

