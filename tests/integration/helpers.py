"""Shared steps for integration tests: write organisations, read the read model, compare."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from adapters.maintenance import rebuild
from adapters.projector import HANDLER_RETRY_BACKOFF_S, Projector
from adapters.relay import Relay
from domain.organisation import OrganisationSettings
from domain.services.organisations import OrganisationService
from infra.wiring import Runtime
from projections import organisations
from projections.base import ReadModel
from tests.conftest import close_nats, table_rows

PIPELINE_STOP_TIMEOUT_S = 30


@contextlib.asynccontextmanager
async def pipeline(runtime: Runtime, model: ReadModel,
                   retry_backoff_s: Sequence[float] = HANDLER_RETRY_BACKOFF_S
                   ) -> AsyncIterator[Projector]:
    """A relay and one read model's projector, running in this event loop for the block."""
    js = await runtime.connect_nats("test")
    stop = asyncio.Event()
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                  runtime.streams)
    projector = Projector(model, runtime.ledger, runtime.projection_pool(), js, runtime.streams,
                          retry_backoff_s=retry_backoff_s)
    tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(projector.run(stop))]
    try:
        yield projector
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), PIPELINE_STOP_TIMEOUT_S)
        await close_nats(runtime)


def service(rt: Runtime) -> OrganisationService:
    return OrganisationService(rt.ledger, lambda: datetime.now(UTC), uuid4)


def write_orgs(rt: Runtime, count: int, prefix: str = "org") -> list[Any]:
    """Create `count` organisations and rename every other one: two event kinds, in order."""
    svc = service(rt)
    ids = []
    for i in range(count):
        written = svc.create(OrganisationSettings(name=f"{prefix}-{i}", billing_email=f"ap{i}@example.in"),
                             actor=None)
        ids.append(written.aggregate.id)
        if i % 2:
            svc.update_settings(written.aggregate.id, OrganisationSettings(name=f"{prefix}-{i}-renamed"),
                                actor=None)
    return ids


def org_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    return table_rows(rt, "organisations")


def rebuilt_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    """What a fresh replay from position 0 gives (the live model is replaced by it)."""
    rebuild(rt.pool, rt.ledger, organisations.READ_MODEL)
    return org_rows(rt)
