"""Shared steps for integration tests: write organisations, read the read model, compare."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from adapters.maintenance import rebuild
from domain.services import OrganisationService
from infra.wiring import Runtime
from projections import organisations
from tests.conftest import table_rows


def service(rt: Runtime) -> OrganisationService:
    return OrganisationService(rt.ledger, lambda: datetime.now(UTC), uuid4)


def write_orgs(rt: Runtime, count: int, prefix: str = "org") -> list[Any]:
    """Create `count` organisations and rename every other one: two event kinds, in order."""
    svc = service(rt)
    ids = []
    for i in range(count):
        written = svc.create({"name": f"{prefix}-{i}", "billing_email": f"ap{i}@example.in"})
        ids.append(written.aggregate.id)
        if i % 2:
            svc.update_settings(written.aggregate.id, {"name": f"{prefix}-{i}-renamed"})
    return ids


def org_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    return table_rows(rt, "organisations")


def rebuilt_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    """What a fresh replay from position 0 gives (the live model is replaced by it)."""
    rebuild(rt.pool, rt.ledger, organisations.READ_MODEL)
    return org_rows(rt)
