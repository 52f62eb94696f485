"""Request ids, request metrics and access logs, as one plain ASGI middleware; /metrics text."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api.deps import OpsSnapshot

log = logging.getLogger("billing.access")

REQUEST_ID_MAX_CHARS = 128
SERIES_MAX = 1000  # labelled series remembered by the middleware (routes x methods x statuses)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Metrics:
    """This process's metrics on its own registry (so several apps can live in one test run)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "billing_http_requests_total", "HTTP requests answered",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "billing_http_request_seconds", "HTTP request latency",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

        self.auth_failures = Counter(
            "billing_auth_failures_total", "Requests refused by authentication or authorisation",
            ["status"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class OpsCollector(Collector):
    """Ledger appends, relay and projector lag, dead letters: read when scraped."""

    def __init__(self, snapshot: Any) -> None:
        self._snapshot = snapshot

    def collect(self) -> Any:
        try:
            s: OpsSnapshot = self._snapshot()
        except Exception:  # a scrape must not fail because Postgres is away
            return
        yield GaugeMetricFamily("billing_ledger_head_position", "Newest ledger position",
                                value=s.ledger_head)
        yield GaugeMetricFamily("billing_ledger_appends_total",
                                "Events appended to the ledger by this process",
                                value=s.ledger_appends)
        yield GaugeMetricFamily("billing_relay_lag_entries",
                                "Ledger entries not yet published to JetStream",
                                value=max(0, s.ledger_head - s.relay_position))
        lag = GaugeMetricFamily("billing_projection_lag_entries",
                                "Ledger positions a read model has not applied yet",
                                labels=["projection"])
        dead = GaugeMetricFamily("billing_dead_letters", "Unresolved dead-lettered ledger entries",
                                 labels=["projection"])
        for name, position in sorted(s.projections.items()):
            lag.add_metric([name], max(0, s.ledger_head - position))
            dead.add_metric([name], s.dead_letters.get(name, 0))
        yield lag
        yield dead
        blocked = GaugeMetricFamily(
            "billing_invoice_blocked_organisations",
            "Organisations the last invoice run of a period could not invoice (dead letters)",
            labels=["period"])
        for period, count in sorted(s.blocked.items()):
            blocked.add_metric([period], count)
        yield blocked
        yield GaugeMetricFamily("billing_payments_for_review",
                                "Payments flagged for a person: no order of ours, beyond what was due,"
                                " or to a void or paid invoice", value=s.payments_for_review)
        yield GaugeMetricFamily("billing_gateway_deliveries_failed",
                                "Recorded gateway deliveries the process manager could not apply",
                                value=s.failed_deliveries)
        yield GaugeMetricFamily("billing_credit_note_refunds_failed",
                                "Credit notes whose refund failed: retry or settle them by hand",
                                value=s.refunds_failed)
        yield GaugeMetricFamily("billing_webhook_deliveries_dead",
                                "Tenant webhook deliveries dead-lettered after 24 h of failures"
                                " (re-send them: docs/WEBHOOKS.md)", value=s.webhook_dead_deliveries)
        yield GaugeMetricFamily("billing_reconciliation_failed",
                                "1 when the newest reconciliation of the ledger found differences"
                                " (billing reconcile, GET /admin/v1/reconciliations)",
                                value=s.reconciliation_failed)


class RequestIdMiddleware:
    """Echo or mint X-Request-Id, count and time every request, log one line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled series, looked up once each (prometheus' labels() is ~5 us a call).
        self._series: dict[tuple[Any, ...], Any] = {}

    def _labelled(self, metric: Any, *labels: str) -> Any:
        series = self._series.get((metric, *labels))
        if series is None:
            if len(self._series) >= SERIES_MAX:
                self._series.clear()
            series = self._series[(metric, *labels)] = metric.labels(*labels)
        return series

    def _observe(self, method: str, route: str, status: int, elapsed: float) -> None:
        self._labelled(self.metrics.requests, method, route, str(status)).inc()
        self._labelled(self.metrics.latency, method, route).observe(elapsed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1"
        )
        request_id = given if _REQUEST_ID.match(given) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or _route_of(scope)
            self._observe(scope["method"], route, status, elapsed)
            log.info("request", extra={"request_id": request_id, "method": scope["method"],
                                       "path": scope["path"], "status": status,
                                       "duration_ms": round(elapsed * 1000, 2)})


def _route_of(scope: Scope) -> str:
    handler = scope.get("route_handler")
    paths = getattr(handler, "paths", None)
    return sorted(paths)[0] if paths else "unmatched"
