"""SGLang-compatible weight-update endpoints of `posttrain serve`.

Request and response bodies follow SGLang's HTTP API, so one client (``posttrain.sync.client``)
drives this server and an SGLang server alike. Updates answer ``{"success": true, "message"}``
with 200, or ``{"success": false, "message"}`` with 400 when the update is refused or fails.

Updates run on their own worker thread and hold the engine lock, so they wait for the running
generation to finish and generation waits for them; ``/pause_generation`` takes that lock until
``/continue_generation`` (updates made in between run without it). With posttrain's engine, which
a loop thread steps (``engine_loop``), updates run on that thread between two steps instead, and
pausing stops the stepping. A broadcast update must not queue behind generation requests, since
the trainer is blocked in the matching collective.

Joining a weight-update group (``/init_weights_update_group``) touches no engine state, so it runs
on a thread of its own, never the engine's: generation goes on while the rendezvous waits, and the
wait is bounded by ``group_timeout_s`` (``--weight-sync-timeout-s``), after which the request
answers 400 naming the address. ``/health`` reports the group as ``joining`` meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Callable, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from posttrain.errors import PosttrainError
from posttrain.server.engine_loop import DEFAULT_WAIT_TIMEOUT_S, EngineLoopTimeout
from posttrain.server.protocol import printable
from posttrain.sync.receiver import WeightReceiver

logger = logging.getLogger("posttrain.server")


class _Lenient(BaseModel):
    # SGLang's requests carry fields we do not act on (abort_all_requests, torch_empty_cache, ...).
    model_config = ConfigDict(extra="ignore", strict=True)


class InitGroupRequest(_Lenient):
    master_address: str = Field(min_length=1, max_length=255)
    master_port: StrictInt = Field(ge=1, le=65535)
    rank_offset: StrictInt = Field(ge=1, le=65535)
    world_size: StrictInt = Field(ge=2, le=65536)
    group_name: str = Field("weight_update_group", min_length=1, max_length=256)
    backend: Literal["nccl", "gloo"] = "nccl"


class DestroyGroupRequest(_Lenient):
    group_name: str = "weight_update_group"


class DistributedUpdateRequest(_Lenient):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[Annotated[int, Field(ge=0)]]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: Optional[str] = None
    load_format: Optional[str] = None


class DiskUpdateRequest(_Lenient):
    model_path: str
    load_format: Optional[str] = None
    flush_cache: bool = True
    weight_version: Optional[str] = None


class TensorUpdateRequest(_Lenient):
    serialized_named_tensors: list[str]
    load_format: Optional[str] = None
    flush_cache: bool = True
    weight_version: Optional[str] = None


class LoraRequest(_Lenient):
    lora_name: str
    lora_path: str


def add_weight_routes(app: FastAPI, server: Any, *, allow_pickled_tensors: bool = False,
                      group_timeout_s: float = 120.0) -> WeightReceiver:
    """Add the weight-update routes to ``app`` (built by ``create_app``; ``server`` is its state)."""
    if not group_timeout_s > 0:
        raise ValueError(f"weight_sync_timeout_s (--weight-sync-timeout-s) must be > 0, got {group_timeout_s}")
    receiver = WeightReceiver(server.engine, allow_pickled_tensors=allow_pickled_tensors)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-weights")
    group_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-weight-group")
    paused = server.paused

    def exclusive(fn: Callable[[], str], name: str) -> str:
        server.activity = (name, time.monotonic())  # /health: requests wait for this
        try:
            if server.engine_loop is not None:  # between two steps, on the thread that owns the engine
                return server.engine_loop.call(fn, what=name)
            if paused.is_set():  # /pause_generation already holds the engine
                return fn()
            if not server.engine_lock.acquire(timeout=DEFAULT_WAIT_TIMEOUT_S):
                raise EngineLoopTimeout(f"{name}: the running generation did not release the engine within "
                                        f"{DEFAULT_WAIT_TIMEOUT_S:g} s.")
            try:
                return fn()
            finally:
                server.engine_lock.release()
        finally:
            server.activity = None

    async def outcome(pending: "asyncio.Future[str]", what: str) -> JSONResponse:
        try:
            message = await pending
        except PosttrainError as exc:
            logger.warning("%s refused: %s", what, exc)
            return JSONResponse({"success": False, "message": printable(str(exc))}, status_code=400)
        except Exception as exc:
            logger.exception("%s failed", what)
            return JSONResponse({"success": False, "message": printable(f"{type(exc).__name__}: {exc}")},
                                status_code=400)
        return JSONResponse({"success": True, "message": printable(message)})

    async def update(fn: Callable[[], str], name: str) -> JSONResponse:
        pending = asyncio.get_running_loop().run_in_executor(worker, exclusive, fn, name)
        return await outcome(pending, name)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        req: InitGroupRequest = await server.read_json(request, InitGroupRequest)
        joining = asyncio.get_running_loop().run_in_executor(
            group_worker, receiver.init_group, req.master_address, req.master_port, req.rank_offset, req.world_size,
            req.group_name, req.backend, group_timeout_s)
        # torch's rendezvous may overrun its own timeout by its retries: the answer comes in time anyway
        # (a join that completes later is closed by the receiver, since nobody waits for it).
        done, _ = await asyncio.wait([joining], timeout=group_timeout_s + 5.0)
        if not done:
            receiver.abandon_group(req.group_name)
            joining.add_done_callback(lambda f: f.cancelled() or f.exception())  # read its late error: no warning
            message = (f"Joining weight-update group '{req.group_name}' at {req.master_address}:{req.master_port} "
                       f"did not finish within {group_timeout_s:g} s (--weight-sync-timeout-s).")
            logger.warning("init_weights_update_group refused: %s", message)
            return JSONResponse({"success": False, "message": message}, status_code=400)
        return await outcome(joining, "init_weights_update_group")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        req: DestroyGroupRequest = await server.read_json(request, DestroyGroupRequest)
        return await update(lambda: receiver.destroy_group(req.group_name), "destroy_weights_update_group")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        req: DistributedUpdateRequest = await server.read_json(request, DistributedUpdateRequest)
        return await update(lambda: receiver.receive_distributed(req.names, req.dtypes, req.shapes, req.group_name,
                                                                 req.weight_version), "update_weights_from_distributed")

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        req: DiskUpdateRequest = await server.read_json(request, DiskUpdateRequest)
        return await update(lambda: receiver.load_from_disk(req.model_path, req.load_format, req.weight_version),
                            "update_weights_from_disk")

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        req: TensorUpdateRequest = await server.read_json(request, TensorUpdateRequest)
        return await update(lambda: receiver.load_from_tensor(req.serialized_named_tensors, req.load_format,
                                                              req.weight_version), "update_weights_from_tensor")

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req: LoraRequest = await server.read_json(request, LoraRequest)
        return await update(lambda: receiver.load_lora_adapter(req.lora_name, req.lora_path), "load_lora_adapter")

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # The transformers engine keeps no cache between requests; an engine with a prefix cache
        # offers flush_cache(). A trainer sharing its parameters' memory (sync.mode=shared) calls
        # this after each update: an engine with fp8 experts quantizes them again first.
        def flush() -> str:
            quantize = getattr(server.engine, "quantize_experts", None)
            if quantize is not None:
                quantize()
            engine_flush = getattr(server.engine, "flush_cache", None)
            if engine_flush is None:
                return "no cache to flush"
            engine_flush()
            return "cache flushed"

        return await update(flush, "flush_cache")

    @app.post("/pause_generation")
    async def pause_generation():
        if not paused.is_set():
            if server.engine_loop is not None:
                hold = server.engine_loop.pause
            else:
                def hold() -> None:
                    timeout_s = DEFAULT_WAIT_TIMEOUT_S
                    if not server.engine_lock.acquire(timeout=timeout_s):
                        raise EngineLoopTimeout(f"pausing generation: the running generation did not finish within "
                                                f"{timeout_s:g} s.")
            try:
                await asyncio.get_running_loop().run_in_executor(worker, hold)
            except EngineLoopTimeout as exc:
                logger.warning("pause_generation refused: %s", exc)
                return JSONResponse({"success": False, "message": str(exc)}, status_code=503)
            paused.set()
        return {"success": True, "message": "generation paused"}

    @app.post("/continue_generation")
    async def continue_generation():
        if paused.is_set():
            paused.clear()
            if server.engine_loop is not None:
                server.engine_loop.resume()
            else:
                server.engine_lock.release()
        return {"success": True, "message": "generation continued"}

    @app.get("/get_weight_version")
    async def get_weight_version():
        return receiver.info()

    @app.get("/weights_checksum")
    async def checksum():
        loop = asyncio.get_running_loop()
        try:
            value = await loop.run_in_executor(worker, exclusive, receiver.checksum, "weights_checksum")
        except PosttrainError as exc:
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        return {"checksum": value, "weight_version": receiver.weight_version}

    return receiver
