"""A client for the weight-update endpoints of `posttrain serve` and of an SGLang server.

The request and response bodies follow SGLang's HTTP API (``/init_weights_update_group``,
``/update_weights_from_distributed``, ``/update_weights_from_disk``, ``/update_weights_from_tensor``,
``/flush_cache``, ``/pause_generation``, ``/continue_generation``, ``/load_lora_adapter``): every
update answers ``{"success": bool, "message": str}``. A call that fails raises :class:`SyncError`
naming the server, the endpoint and the server's message.
"""

from __future__ import annotations

from typing import Any, Sequence

import httpx

from posttrain.sync.base import SyncError


def server_root(base_url: str) -> str:
    """``http://host:port`` from a base URL that may end in ``/v1`` or ``/``."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class EngineClient:
    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 600.0,
                 http: httpx.Client | None = None) -> None:
        """``http``: an httpx client to use instead of a new one (e.g. FastAPI's TestClient)."""
        self.base_url = server_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, check_success: bool = True) -> Any:
        try:
            response = self.http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise SyncError(f"{method} {self.base_url}{path} timed out after {self.http.timeout.read}s; the "
                            "engine is stuck or too slow (see its log).") from None
        except httpx.HTTPError as exc:
            raise SyncError(f"Cannot reach the engine at {self.base_url} ({type(exc).__name__}: {exc}). Start it "
                            "(`posttrain serve --model ...`) or fix rollout.base_url.") from None
        try:
            data = response.json()
        except ValueError:
            data = response.text
        failed = response.status_code >= 400 or (check_success and isinstance(data, dict) and data.get("success") is False)
        if failed:
            message = data.get("message") or data.get("error", {}).get("message") if isinstance(data, dict) else data
            raise SyncError(f"{self.base_url}{path} failed (HTTP {response.status_code}): {message}")
        return data

    # -- SGLang-compatible weight updates ---------------------------------------------------------

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> dict[str, Any]:
        """Ask the engine to join a process group whose rank 0 is the trainer. Blocks until the
        engine has joined, so call it while the trainer joins too (e.g. from a thread)."""
        return self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict[str, Any]:
        return self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: str | None = None) -> dict[str, Any]:
        """Announce a bucket of tensors that rank 0 is about to broadcast, in this order."""
        body: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                                "group_name": group_name, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._call("POST", "/update_weights_from_distributed", body)

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, flush_cache: bool = True,
                                 weight_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_path": model_path, "load_format": load_format, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._call("POST", "/update_weights_from_disk", body)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                   flush_cache: bool = True, weight_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
                                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        return self._call("POST", "/update_weights_from_tensor", body)

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        return self._call("POST", "/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path})

    def flush_cache(self) -> None:
        self._call("POST", "/flush_cache", check_success=False)

    def pause_generation(self) -> None:
        self._call("POST", "/pause_generation", {}, check_success=False)

    def continue_generation(self) -> None:
        self._call("POST", "/continue_generation", {}, check_success=False)

    # -- posttrain extensions ---------------------------------------------------------------------

    def weight_version(self) -> dict[str, Any] | None:
        """``{"weight_version", "instance_id"}``: what the engine holds and which process it is
        (a new ``instance_id`` means it restarted). ``None`` when the server does not say."""
        try:
            return self._call("GET", "/get_weight_version", check_success=False)
        except SyncError:
            return None

    def weights_checksum(self) -> str:
        """SHA-256 over the engine's weights (``posttrain.models.weights.weights_checksum``)."""
        return self._call("GET", "/weights_checksum", check_success=False)["checksum"]
