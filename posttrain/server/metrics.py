"""``GET /metrics`` of `posttrain serve`: Prometheus text exposition (``prometheus_client``).

Each app has its own registry (several apps may live in one process, as in the tests). Request
counts and latencies are taken by an ASGI middleware around the whole app, so every answer is
counted, errors included; the endpoint label is the route's path template (unknown paths are
``other``), which keeps the label set small. The gauges read the server's state when scraped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

logger = logging.getLogger("posttrain.server")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _numeric_version(version: str) -> float:
    try:
        return float(version)
    except ValueError:  # "initial", or a version that is not a number
        return -1.0


def add_metrics(app: FastAPI, server: Any, receiver: Any) -> None:
    """Add ``GET /metrics`` and the request-counting middleware to ``app`` (a `posttrain serve`
    app: ``server`` is its state, ``receiver`` its ``WeightReceiver``). Without
    ``prometheus_client`` the app is served without /metrics (a warning says so)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    except ImportError:
        logger.warning("prometheus_client is not installed: no /metrics (pip install 'posttrain[serve]')")
        return
    registry = CollectorRegistry()
    requests = Counter("posttrain_requests", "HTTP requests answered, by endpoint and status code.",
                       ["endpoint", "status"], registry=registry)
    latency = Histogram("posttrain_request_duration_seconds", "Time from request to the end of the answer "
                        "(a stream's last event), by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS_S,
                        registry=registry)
    _LiveCounter(registry, "posttrain_generated_tokens", "Completion tokens generated (EOS included), over all "
                 "requests.", server.generated_tokens)
    Gauge("posttrain_queue_depth", "Requests admitted that wait (behind a pause, or for the engine).",
          registry=registry).set_function(server.queue_depth)
    Gauge("posttrain_requests_in_flight", "Requests admitted and not yet answered.",
          registry=registry).set_function(lambda: server.admitted)
    Gauge("posttrain_running_sequences", "Sequences the engine is generating now.",
          registry=registry).set_function(lambda: server.num_sequences()[0])
    Gauge("posttrain_waiting_sequences", "Sequences in the engine waiting for a slot or KV blocks.",
          registry=registry).set_function(lambda: server.num_sequences()[1])
    Gauge("posttrain_paused", "1 while generation is paused (/pause_generation), else 0.",
          registry=registry).set_function(lambda: float(server.paused.is_set()))
    Gauge("posttrain_weight_version", "The last weight_version loaded, if it is a number (-1: the initial weights "
          "or a version that is not a number).", registry=registry).set_function(
        lambda: _numeric_version(receiver.weight_version))

    class _Count:
        """ASGI middleware: count and time every request."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            start = time.perf_counter()
            status = 500  # unless a response starts

            async def tracked_send(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, tracked_send)
            finally:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "other"
                requests.labels(endpoint=endpoint, status=str(status)).inc()
                latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

    app.add_middleware(_Count)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _LiveCounter:
    """A counter whose value is read when scraped (the engine counts its tokens itself)."""

    def __init__(self, registry: Any, name: str, documentation: str, read: Any) -> None:
        self.name, self.documentation, self.read = name, documentation, read
        registry.register(self)

    def describe(self) -> list:
        from prometheus_client.core import CounterMetricFamily  # optional (serve extra): see add_metrics

        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> list:
        from prometheus_client.core import CounterMetricFamily  # optional (serve extra): see add_metrics

        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], float(self.read()))
        return [family]
