"""Liveness, readiness (Postgres and NATS reachable) and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from litestar import Request, Response, get

from api.deps import ApiDeps

READY_CHECK_TIMEOUT_S = 2.0


@get("/health/live", summary="The process is up", include_in_schema=True)
async def live() -> dict[str, str | int]:
    # The process id tells which of `serve`'s API processes answered (they share the port).
    return {"status": "ok", "process": os.getpid()}


@get("/health/ready", summary="Postgres and NATS are reachable")
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    deps: ApiDeps = request.app.state.deps
    results: dict[str, bool] = {}
    for name, check in deps.readiness.items():
        try:
            results[name] = await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
        except Exception:
            results[name] = False
    ok = all(results.values())
    return Response(
        {"status": "ok" if ok else "unavailable", "checks": results},
        status_code=200 if ok else 503,
        headers={} if ok else {"Retry-After": "1"},
    )


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    registry = request.app.state.metrics
    body = await asyncio.to_thread(registry.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
