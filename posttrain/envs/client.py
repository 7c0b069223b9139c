"""A client of the rollout API (``posttrain rollout-api``, docs/rollout_api.md).

Environment processes use ``register`` and ``submit_group``; the trainer (``rollout.source: api``)
uses ``start_trainer``, ``get_batch``, ``ack`` and ``post_policy_version``. A full queue (429) and
an unreachable server are retried with exponential backoff (honouring Retry-After), so a slow
trainer slows the environments down instead of failing them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import httpx

from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.envs")


class RolloutAPIError(PosttrainError):
    """The rollout API refused a request, or could not be reached within the retries."""


class RolloutAPIClient:
    """One environment (or trainer) talking to the rollout API at ``base_url``.

    max_retries: attempts after the first for 429s and connection errors (``None``: forever, as
    an environment that should wait for a trainer would). backoff_s: the first wait, doubled per
    attempt up to ``max_backoff_s``; a server's Retry-After takes precedence when longer.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 30.0, max_retries: int | None = 8,
                 backoff_s: float = 0.25, max_backoff_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._registration: dict[str, Any] | None = None
        self.num_retries = 0  # 429s and connection errors retried so far

    # -- environments ----------------------------------------------------------------------------

    def register(self, name: str, group_size: int) -> dict[str, Any]:
        """Register this environment; returns the server's answer (with ``policy_version``)."""
        self._registration = {"name": name, "group_size": group_size}
        return self._request("POST", "/register", json=self._registration)

    def submit_group(self, prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]], scores: Sequence[float],
                     *, policy_version: int, logprobs: Sequence[Sequence[float]] | None = None,
                     masks: Sequence[Sequence[int]] | None = None, finish_reasons: Sequence[str] | None = None,
                     metadata: dict[str, Any] | None = None) -> str:
        """Submit one scored group (one prompt, ``group_size`` completions); returns ``"queued"`` or
        ``"dropped_stale"`` (the trainer is already more than max_staleness versions ahead)."""
        if self._registration is None:
            raise RolloutAPIError("submit_group before register: call register(name, group_size) first.")
        body: dict[str, Any] = {
            "env": self._registration["name"], "policy_version": int(policy_version),
            "prompt_ids": [int(t) for t in prompt_ids], "completion_ids": [[int(t) for t in c] for c in completion_ids],
            "scores": [float(s) for s in scores],
        }
        for key, value in (("logprobs", logprobs), ("masks", masks), ("finish_reasons", finish_reasons),
                           ("metadata", metadata)):
            if value is not None:
                body[key] = value
        try:
            return self._request("POST", "/groups", json=body)["status"]
        except RolloutAPIError as exc:
            if getattr(exc, "code", None) != "unknown_env":
                raise
            # The server restarted without a journal: register again and resend once.
            self._request("POST", "/register", json=self._registration)
            return self._request("POST", "/groups", json=body)["status"]

    def prompts(self, n: int = 1) -> list[dict[str, Any]]:
        """The next ``n`` rows of the server's ``--prompts`` file, as ``{"index", "epoch", "row"}``."""
        return self._request("GET", "/prompts", params={"n": n})["prompts"]

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")

    def policy_version(self) -> int:
        return int(self.status()["policy_version"])

    # -- the trainer -----------------------------------------------------------------------------

    def start_trainer(self, version: int) -> int:
        """A (re)started trainer at ``version``: groups leased earlier and never acked are queued again.
        Returns how many."""
        return int(self._request("POST", "/trainer/start", json={"version": int(version)})["requeued"])

    def get_batch(self, size: int, wait_s: float = 5.0) -> tuple[str | None, list[dict[str, Any]]]:
        """``size`` groups under a batch id, or ``(None, [])`` if fewer were queued within ``wait_s``."""
        out = self._request("GET", "/batch", params={"size": size, "wait_s": wait_s})
        return out["batch_id"], out["groups"]

    def ack(self, batch_id: str) -> int:
        return int(self._request("POST", "/ack", json={"batch_id": batch_id})["acked"])

    def post_policy_version(self, version: int) -> int:
        """Tell the server the trainer's policy version; returns the number of groups dropped as stale."""
        return int(self._request("POST", "/policy_version", json={"version": int(version)})["dropped_stale"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RolloutAPIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        attempt = 0
        while True:
            wait = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"the rollout API at {self.base_url} is unreachable ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code != 429:
                    raise _api_error(resp, method, path)
                problem = f"the rollout API's queue is full ({self.base_url})"
                retry_after = resp.headers.get("retry-after", "")
                wait = max(wait, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else wait
            if self.max_retries is not None and attempt >= self.max_retries:
                raise RolloutAPIError(f"{method} {path}: {problem}; gave up after {attempt + 1} attempts. Check that "
                                      "`posttrain rollout-api` runs and a trainer consumes its batches.")
            attempt += 1
            self.num_retries += 1
            logger.debug("%s %s: %s; retrying in %.2f s", method, path, problem, wait)
            time.sleep(wait)


def _api_error(resp: httpx.Response, method: str, path: str) -> RolloutAPIError:
    try:
        error = resp.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = resp.text[:500], None
    exc = RolloutAPIError(f"{method} {path} failed with HTTP {resp.status_code}: {message}")
    exc.code = code  # type: ignore[attr-defined]
    return exc
