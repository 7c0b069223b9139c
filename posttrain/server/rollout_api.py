"""The rollout API (Atropos-style): environments submit scored groups, the trainer pulls batches.

Environment processes ``POST /register`` (name, group size), generate through an inference server
of their own choosing (e.g. ``posttrain serve``'s ``/generate``), score, and ``POST /groups``. The
trainer (``rollout.source: api``) calls ``POST /trainer/start`` once, then per step
``GET /batch?size=N`` -> train -> ``POST /ack`` -> ``POST /policy_version``. ``GET /status`` reports
the queue and per-environment counts. Environments without data of their own take rows from
``GET /prompts`` (``--prompts FILE.jsonl``). See docs/rollout_api.md.

Design notes:
- The queue is bounded and shared fairly: each registered environment may hold
  ``ceil(max_groups / number of environments)`` queued groups, and a submission beyond its share
  gets 429 with Retry-After, so environments slow down instead of the server growing without
  bound, and a fast environment cannot crowd out a slow one. (An environment that registers late
  gets its share as the others' excess drains.) Batches take groups from the environments in turn.
- A group is stale when the trainer's policy version is more than ``max_staleness`` versions
  ahead of the version that generated it. Stale groups are dropped (at submission, when the
  trainer posts a new version, and before a batch is handed out) and counted per environment.
- Nothing is lost on restarts. Groups handed to the trainer stay "leased" until the trainer acks
  them after its update; ``POST /trainer/start`` (a new or resumed trainer) puts leased groups
  back at the front of the queue. Every change is appended to a JSONL journal, which a restarted
  server replays (then compacts), so queued and leased groups survive a server restart too.
- All queue operations run on the event loop thread, so they need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from pydantic import Field, StrictInt

from posttrain.server.group_queue import MAX_ENVIRONMENTS, GroupQueue, PromptFeed, QueueFull, TooManyEnvironments
from posttrain.server.protocol import APIError, _Strict, install_error_handlers, read_json

logger = logging.getLogger("posttrain.rollout_api")

MAX_BATCH_WAIT_S = 60.0  # longest long-poll of GET /batch


# ----------------------------------------------------------------------------------------------
# HTTP


class RegisterRequest(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    group_size: int = Field(ge=1, le=4096)


class GroupSubmission(_Strict):
    """One scored group: ``group_size`` completions of one prompt. Lists are per completion."""

    env: str = Field(min_length=1, max_length=128)
    policy_version: int = Field(ge=0)
    prompt_ids: list[StrictInt] = Field(min_length=1)
    completion_ids: list[list[StrictInt]] = Field(min_length=1)
    scores: list[float]
    logprobs: Optional[list[list[float]]] = None  # of each completion token; None: the trainer computes them
    masks: Optional[list[list[Literal[0, 1]]]] = None  # 0: a token the model did not generate (an observation)
    finish_reasons: Optional[list[Literal["stop", "length"]]] = None
    metadata: Optional[dict[str, Any]] = None


class AckRequest(_Strict):
    batch_id: str = Field(min_length=1, max_length=64)


class VersionRequest(_Strict):
    version: int = Field(ge=0)


def _check_group(group: GroupSubmission, group_size: int) -> None:
    n = len(group.completion_ids)
    if n != group_size:
        raise APIError(400, f"The group has {n} completions but environment '{group.env}' registered group_size "
                       f"{group_size}. Send groups of the registered size, or register again.",
                       param="completion_ids", code="invalid_value")
    for name in ("scores", "logprobs", "masks", "finish_reasons"):
        value = getattr(group, name)
        if value is not None and len(value) != n:
            raise APIError(400, f"'{name}' has {len(value)} entries for {n} completions; give one per completion.",
                           param=name, code="invalid_value")
    for name, ids in (("prompt_ids", group.prompt_ids), ("completion_ids", [t for c in group.completion_ids for t in c])):
        if any(t < 0 for t in ids):
            raise APIError(400, f"Token ids must be >= 0 (in '{name}').", param=name, code="invalid_value")
    for i, ids in enumerate(group.completion_ids):
        if not ids:
            raise APIError(400, f"Completion {i} is empty (0 tokens).", param=f"completion_ids[{i}]",
                           code="invalid_value")
        for name in ("logprobs", "masks"):
            per_token = getattr(group, name)
            if per_token is not None and len(per_token[i]) != len(ids):
                raise APIError(400, f"'{name}[{i}]' has {len(per_token[i])} entries for {len(ids)} completion tokens.",
                               param=f"{name}[{i}]", code="invalid_value")
    if group.logprobs is not None and any(lp > 0 for row in group.logprobs for lp in row):
        raise APIError(400, "Logprobs must be <= 0.", param="logprobs", code="invalid_value")


def create_rollout_api_app(queue: GroupQueue, *, max_request_bytes: int = 64 << 20,
                           prompts: PromptFeed | None = None) -> FastAPI:
    """The rollout API over ``queue``. Bodies over ``max_request_bytes`` get 413. ``prompts``:
    rows served at ``GET /prompts`` (without it that endpoint answers 404)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title="posttrain rollout API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.queue = queue

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return queue.status()

    @app.post("/register")
    async def register(request: Request) -> dict[str, Any]:
        req: RegisterRequest = await read_json(request, max_request_bytes, RegisterRequest)
        try:
            return queue.register(req.name, req.group_size)
        except TooManyEnvironments:
            raise APIError(400, f"{MAX_ENVIRONMENTS} environments are registered already; reuse a name.",
                           param="name", code="too_many_environments") from None

    @app.post("/groups")
    async def submit(request: Request) -> dict[str, Any]:
        group: GroupSubmission = await read_json(request, max_request_bytes, GroupSubmission)
        env = queue.envs.get(group.env)
        if env is None:
            raise APIError(409, f"Environment '{group.env}' is not registered; POST /register first.", param="env",
                           code="unknown_env")
        _check_group(group, env["group_size"])
        try:
            result = queue.submit(group.model_dump())
        except QueueFull:
            raise APIError(429, f"Environment '{group.env}' holds its share of the queue ({queue.share()} of "
                           f"{queue.max_groups} groups wait for the trainer). Retry later.",
                           type="rate_limit_error", code="queue_full") from None
        return {"status": result, "policy_version": queue.policy_version}

    @app.get("/batch")
    async def batch(size: int, wait_s: float = 0.0) -> dict[str, Any]:
        if not 1 <= size <= queue.max_groups:
            raise APIError(400, f"Invalid value for 'size': must be between 1 and the queue bound {queue.max_groups}, "
                           f"got {size}. Start the rollout API with a larger --max-queue-groups.", param="size",
                           code="invalid_value")
        if not 0 <= wait_s <= MAX_BATCH_WAIT_S:
            raise APIError(400, f"Invalid value for 'wait_s': must be between 0 and {MAX_BATCH_WAIT_S}.",
                           param="wait_s", code="invalid_value")
        deadline = time.monotonic() + wait_s
        while (taken := queue.take(size)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if taken is None:
            return {"batch_id": None, "groups": [], "queued": len(queue.queued), "policy_version": queue.policy_version}
        batch_id, groups = taken
        return {"batch_id": batch_id, "groups": groups, "queued": len(queue.queued),
                "policy_version": queue.policy_version}

    @app.get("/prompts")
    async def next_prompts(n: int = 1) -> dict[str, Any]:
        if prompts is None:
            raise APIError(404, "This rollout API serves no prompts; start it with --prompts FILE.jsonl, or let "
                           "the environments read their own data.", type="not_found_error", code="no_prompts")
        if not 1 <= n <= 1024:
            raise APIError(400, f"Invalid value for 'n': must be between 1 and 1024, got {n}.", param="n",
                           code="invalid_value")
        return {"prompts": prompts.next(n)}

    @app.post("/ack")
    async def ack(request: Request) -> dict[str, Any]:
        req: AckRequest = await read_json(request, 4096, AckRequest)
        return {"acked": queue.ack(req.batch_id)}

    @app.post("/policy_version")
    async def policy_version(request: Request) -> dict[str, Any]:
        req: VersionRequest = await read_json(request, 4096, VersionRequest)
        return {"policy_version": req.version, "dropped_stale": queue.set_policy_version(req.version)}

    @app.post("/trainer/start")
    async def trainer_start(request: Request) -> dict[str, Any]:
        req: VersionRequest = await read_json(request, 4096, VersionRequest)
        return {"policy_version": req.version, "requeued": queue.trainer_start(req.version)}

    return app


def run_rollout_api(args: Any) -> int:
    """``posttrain rollout-api``: serve the rollout API with uvicorn until interrupted."""
    from posttrain.server.uvicorn_run import run_until_signal  # uvicorn (optional, serve extra) only now

    try:
        prompts = PromptFeed(args.prompts, args.seed) if args.prompts else None
    except (OSError, ValueError) as exc:
        print(f"posttrain: error: --prompts: {exc}", file=sys.stderr)
        return 2
    queue = GroupQueue(max_groups=args.max_queue_groups, max_staleness=args.max_staleness, journal=args.journal or None)
    if not args.journal:
        logger.warning("no --journal: groups queued here are lost if this server restarts")
    app = create_rollout_api_app(queue, max_request_bytes=args.max_request_bytes, prompts=prompts)
    logger.info("rollout API on http://%s:%d (queue bound %d groups, max_staleness %d, %d groups restored)",
                args.host, args.port, args.max_queue_groups, args.max_staleness, len(queue.queued))
    run_until_signal(app, args.host, args.port, log_level="warning")  # Ctrl-C/SIGTERM: exit 130/143
    return 0
