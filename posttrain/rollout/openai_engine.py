"""``rollout.backend=openai``: generation on a remote OpenAI-compatible server.

Token ids go in and come out, so the trainer sees exactly the tokens that were sampled:
- `posttrain serve` offers ``/generate`` (token ids in; token ids, logprobs and finish reason out);
  it is used when the server answers ``/get_weight_version`` the way `posttrain serve` does.
- Any other server (vLLM, SGLang, ...) gets ``/v1/completions`` with the prompt as token ids and
  ``logprobs=0`` (the sampled tokens' logprobs). The response carries text, so the completion's
  ids are the text re-tokenized; when the server stopped at EOS, the EOS id is appended (the model
  must learn to stop) with logprob 0.0, since the OpenAI API does not report it. Prefer
  ``algorithm.off_policy_correction=tis_token`` with such servers: the trainer then recomputes old logprobs.

Each prompt's group (``n`` completions) is one request; up to ``max_concurrency`` are in flight,
so a server with continuous batching sees them all at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from posttrain.errors import PosttrainError
from posttrain.sampling import Completion, SamplingParams
from posttrain.sync.client import server_root

logger = logging.getLogger("posttrain.rollout")


class RemoteEngineError(PosttrainError):
    """The rollout server is unreachable or refused a request."""


class OpenAIEngine:
    def __init__(self, base_url: str, tokenizer: Any, *, api_key: str = "", model_name: str = "",
                 max_concurrency: int = 32, timeout_s: float = 600.0, eos_token_ids: Sequence[int] = (),
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 http: httpx.Client | None = None) -> None:
        """``autocast``: the trainer's autocast context factory, for the trainer's own forward passes
        (the recipe asks the engine for it, as it does the in-process engine). ``http``: an httpx
        client to use instead of a new one (e.g. FastAPI's TestClient)."""
        self.base_url = server_root(base_url)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_concurrency = max_concurrency
        self.autocast = autocast
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = sorted(eos | set(eos_token_ids))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self.http = http or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, limits=limits)
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="posttrain-remote")
        self._native: bool | None = None  # does the server offer posttrain's /generate?
        self._warned_eos = False
        self._warned_tokens = False

    # -- RolloutEngine ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self._native is None:
            self._native = self._probe()
        request = self._generate_native if self._native else self._generate_completions
        seeds = [None if params.seed is None else params.seed + i for i in range(len(prompts))]
        return list(self.pool.map(lambda args: request(list(args[0]), params, args[1]), zip(prompts, seeds)))

    def update_weights(self, named_tensors: dict | None = None) -> None:
        """Weights reach the server through ``posttrain.sync`` (sync.mode), not through this call."""
        if named_tensors is not None:
            raise RemoteEngineError("A remote engine takes weights through sync.mode (broadcast, checkpoint, lora), "
                                    "not update_weights(named_tensors).")

    def sleep(self) -> None:
        """Nothing to release here: the server holds the generation memory."""

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    # -- requests --------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.http.post(path, json=body)
        except httpx.TimeoutException:
            raise RemoteEngineError(f"The rollout server at {self.base_url} took longer than "
                                    f"rollout.request_timeout_s={self.http.timeout.read:g}s for {path}; raise it "
                                    "or lower rollout.max_concurrency.") from None
        except httpx.HTTPError as exc:
            raise RemoteEngineError(f"Cannot reach the rollout server at {self.base_url} ({type(exc).__name__}: "
                                    f"{exc}). Start it (`posttrain serve --model PATH --port PORT`) or fix "
                                    "rollout.base_url.") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                message = response.text
            raise RemoteEngineError(f"The rollout server at {self.base_url} answered {path} with HTTP "
                                    f"{response.status_code}: {message}")
        return response.json()

    def _probe(self) -> bool:
        try:
            info = self.http.get("/get_weight_version")
            try:
                native = info.status_code == 200 and "instance_id" in info.json()
            except ValueError:
                native = False
            if not native and not self.model_name:
                models = self.http.get("/v1/models")
                self.model_name = ((models.json().get("data") or [{}])[0].get("id", "")
                                   if models.status_code == 200 else "")
        except httpx.HTTPError as exc:
            raise RemoteEngineError(f"Cannot reach the rollout server at {self.base_url} ({type(exc).__name__}: "
                                    f"{exc}). Start it (`posttrain serve --model PATH --port PORT`) or fix "
                                    "rollout.base_url.") from None
        logger.info("remote engine %s: using %s", self.base_url, "/generate" if native else "/v1/completions")
        return native

    def _generate_native(self, prompt: list[int], params: SamplingParams, seed: int | None) -> list[Completion]:
        sampling = {"n": params.n, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "max_new_tokens": params.max_tokens, "stop": list(params.stop), "seed": seed,
                    "logprobs": params.logprobs}
        out = self._post("/generate", {"input_ids": prompt, "sampling_params": sampling})
        outputs = out if isinstance(out, list) else [out]
        return [Completion(prompt_token_ids=prompt, token_ids=list(o["output_ids"]), text=o["text"],
                           logprobs=list(o["logprobs"] or []), finish_reason=o["finish_reason"],
                           token_versions=_token_versions(o)) for o in outputs]

    def _generate_completions(self, prompt: list[int], params: SamplingParams, seed: int | None) -> list[Completion]:
        body: dict[str, Any] = {"model": self.model_name, "prompt": prompt, "n": params.n,
                                "temperature": params.temperature, "top_p": params.top_p,
                                "max_tokens": params.max_tokens, "logprobs": 0}
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = seed
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM and SGLang extension
        out = self._post("/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [self._from_choice(prompt, choice, params) for choice in choices]

    def _from_choice(self, prompt: list[int], choice: dict[str, Any], params: SamplingParams) -> Completion:
        text = choice["text"]
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        stop_hit = next((s for s in params.stop if text.endswith(s)), None) if finish == "stop" else None
        if finish == "stop" and params.stop and stop_hit is None and choice.get("stop_reason") in params.stop:
            text += choice["stop_reason"]  # vLLM reports which stop string ended the text; keep it, as /generate does
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        reported = (choice.get("logprobs") or {}).get("token_logprobs") or []
        logprobs = [float(x) if x is not None else 0.0 for x in reported]
        if len(logprobs) != len(ids):
            # The server's tokens are not the re-tokenized text's (or a stop string was added back):
            # align by position, 0.0 where the server gave none.
            if not self._warned_tokens:
                logger.warning("remote engine %s: %d logprobs for %d re-tokenized tokens; aligning by position "
                               "(set algorithm.off_policy_correction=tis_token so the trainer recomputes old logprobs)",
                               self.base_url, len(logprobs), len(ids))
                self._warned_tokens = True
            logprobs = (logprobs + [0.0] * len(ids))[: len(ids)]
        ended_at_eos = finish == "stop" and not any(text.endswith(s) for s in params.stop)
        if ended_at_eos and self.eos_token_ids:
            ids.append(self.eos_token_ids[0])
            logprobs.append(0.0)
            if not self._warned_eos:
                logger.warning("remote engine %s reports no logprob for EOS; using 0.0 (set "
                               "algorithm.off_policy_correction=tis_token to recompute old logprobs in the trainer)", self.base_url)
                self._warned_eos = True
        return Completion(prompt_token_ids=prompt, token_ids=ids, text=text, logprobs=logprobs, finish_reason=finish)


def _token_versions(output: dict[str, Any]) -> list[int] | None:
    """The per-token weight versions `posttrain serve` reports in ``meta_info`` (None from servers
    that do not, or do not for every token: the trainer then counts the version it last synced)."""
    versions = (output.get("meta_info") or {}).get("token_versions")
    if not isinstance(versions, list) or len(versions) != len(output["output_ids"]):
        return None
    return [int(v) for v in versions]
