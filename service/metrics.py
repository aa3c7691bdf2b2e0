"""The gateway's Prometheus metrics, served at ``GET /metrics`` (docs/metrics.md lists every one).

Labels take bounded values only: route templates (a raw path would carry tenant, job and adapter
ids), status classes, job kinds, queue names and the API's error codes. The metric objects live
at module level, so every app built in one process adds to the same series; each app gets its
own registry because its queue-depth collector reads that app's Redis connection.
"""

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import worker_registry
from service.core.queue import QUEUES
from service.core.retention import removed_counts

if TYPE_CHECKING:
    from service.context import Services

# Prometheus stores each `_created` sample as one more series; nothing here reads them.
disable_created_metrics()
HTTP_REQUESTS = Counter(
    "atomtune_http_requests_total",
    "HTTP requests answered, by method, route template and status class.",
    ["method", "route", "status_class"],
    registry=None,
)
HTTP_DURATION = Histogram(
    "atomtune_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response body (event streams and ?wait= included).",
    ["method", "route", "status_class"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=None,
)
JOBS_SUBMITTED = Counter("atomtune_jobs_submitted_total", "Jobs put on a queue, by kind.", ["kind"], registry=None)
AUTH_FAILURES = Counter(
    "atomtune_auth_failures_total", "Requests refused for a missing, unknown or revoked API key.", registry=None
)
REJECTED = Counter(
    "atomtune_requests_rejected_total",
    "Requests answered with a 4xx or a 503, by the API's error code.",
    ["reason"],
    registry=None,
)
_SHARED = (HTTP_REQUESTS, HTTP_DURATION, JOBS_SUBMITTED, AUTH_FAILURES, REJECTED)
# Label sets that exist from the start, at zero: a rate or ratio over them has a value before the
# first event, where a series created by its first increment would leave it empty.
for _kind in QUEUES:
    JOBS_SUBMITTED.labels(_kind)
for _reason in ("invalid_request", "unauthenticated", "not_found", "too_many_jobs", "unavailable"):
    REJECTED.labels(_reason)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Error bodies are a short JSON object; a longer one is not ours and is not worth buffering.
_MAX_ERROR_BODY = 4096


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "other"
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else "other"


class MetricsMiddleware:
    """Counts and times every HTTP request; the outermost middleware, so it also sees early refusals."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return str(route.path)
        # FastAPI records the matched route in the scope; a request refused before routing (a body
        # over the limit) has none, so its path is matched against the API's route templates.
        if self._templates is None:
            self._templates = [(compile_path(path)[0], path) for path in self.api.openapi()["paths"]]
        return next((template for regex, template in self._templates if regex.match(scope["path"])), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        error_body: bytearray | None = None

        async def observing_send(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    error_body = bytearray()
            elif message["type"] == "http.response.body" and error_body is not None:
                error_body += message.get("body", b"")[: _MAX_ERROR_BODY - len(error_body)]
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            labels = (method, self._route(scope), f"{status // 100}xx")
            HTTP_REQUESTS.labels(*labels).inc()
            HTTP_DURATION.labels(*labels).observe(time.perf_counter() - started)
            if 400 <= status < 500 or status == 503:
                code = _error_code(bytes(error_body or b""))
                REJECTED.labels(code).inc()
                if code == "unauthenticated":
                    AUTH_FAILURES.inc()


class RedisCollector(Collector):
    """Reads queue depths and live workers from Redis at scrape time, so they are never stale."""

    def __init__(self, services: Callable[[], "Services | None"]) -> None:
        self.services = services

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "atomtune_queue_depth", "Messages waiting in a job queue (not yet taken by a worker).", labels=["queue"]
        )
        workers = GaugeMetricFamily("atomtune_workers_alive", "Workers whose heartbeat is recent.")
        removed = CounterMetricFamily(
            "atomtune_retention_removed",
            "What the workers' retention sweeps removed: ended jobs' records, generations' images, training uploads.",
            labels=["kind"],
        )
        services = self.services()
        if services is not None:
            try:
                # Messages are sent without a priority, so each queue is the one Redis list of its name.
                with services.db.pipeline(transaction=False) as pipe:
                    for queue in QUEUES.values():
                        pipe.llen(queue)
                    sizes = pipe.execute()
                alive = worker_registry.alive(services.db, services.settings.worker_heartbeat_seconds)
                removed_so_far = removed_counts(services.db)
            except RedisError:
                # An unreachable Redis leaves the series absent rather than reporting a false zero.
                pass
            else:
                for name, size in zip(QUEUES, sizes, strict=True):
                    depth.add_metric([name], size)
                workers.add_metric([], len(alive))
                for kind, count in removed_so_far.items():
                    removed.add_metric([kind], count)
        yield depth
        yield workers
        yield removed


def install_metrics(app: FastAPI) -> None:
    """Adds the request metrics middleware and ``GET /metrics`` (unauthenticated, as Prometheus expects;
    it carries no tenant data)."""
    registry = CollectorRegistry()
    for metric in _SHARED:
        registry.register(metric)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(RedisCollector(lambda: getattr(app.state, "services", None)))
    app.add_middleware(MetricsMiddleware, api=app)

    def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
