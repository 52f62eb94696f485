"""Liveness, readiness (Postgres and NATS reachable, with the configuration warnings) and
Prometheus metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from api.client_ip import client_ip
from api.credentials import bearer_token
from api.deps import ApiDeps, Deps
from api.problems import Forbidden, Unauthenticated

READY_CHECK_TIMEOUT_S = 2.0
# The text format generate_latest writes (charset included). Sent as the header itself: given as
# a media type, Litestar appends its own "; charset=utf-8" to any text/* one, a second charset.
METRICS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


@get("/health/live", summary="The process is up", include_in_schema=True)
async def live() -> dict[str, str | int]:
    # The process id tells which of `serve`'s API processes answered (they share the port).
    return {"status": "ok", "process": os.getpid()}


@get("/health/ready", summary="Postgres and NATS are reachable; configuration warnings")
async def ready(deps: Deps) -> Response[dict[str, Any]]:
    # `warnings` name configuration that is incomplete (a missing SUPPLIER_GSTIN) but never
    # makes the process unready: it can still take usage and serve reads.
    results: dict[str, bool] = {}
    for name, check in deps.readiness.items():
        try:
            results[name] = await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
        except Exception:
            results[name] = False
    ok = all(results.values())
    return Response(
        {"status": "ok" if ok else "unavailable", "checks": results,
         "warnings": list(deps.warnings)},
        status_code=200 if ok else 503,
        headers={} if ok else {"Retry-After": "1"},
    )


def _may_scrape(request: Request[Any, Any, Any], deps: ApiDeps) -> None:
    """The bearer token when one is configured; else only a client on this host (through a
    trusted proxy, the client it speaks for: a proxy on this host is not the scraper)."""
    if deps.metrics_token_sha256 is not None:
        given = hashlib.sha256(bearer_token(request).encode()).digest()
        if not hmac.compare_digest(given, deps.metrics_token_sha256):
            raise Unauthenticated("/metrics needs the scraper's bearer token")
        return
    address = client_ip(request, deps.trusted_proxies)
    try:
        local = ipaddress.ip_address(address).is_loopback
    except ValueError:
        local = False
    if not local:
        raise Forbidden("/metrics answers this host only; set BILLING_METRICS_TOKEN to scrape it "
                        "from elsewhere")


@get("/metrics", summary="Prometheus metrics (BILLING_METRICS_TOKEN, or this host only)",
     media_type=METRICS_CONTENT_TYPE)
async def metrics(request: Request[Any, Any, Any], deps: Deps) -> Response[bytes]:
    _may_scrape(request, deps)
    registry = request.app.state.metrics
    body = await asyncio.to_thread(registry.render)
    return Response(body, headers={"content-type": METRICS_CONTENT_TYPE})
