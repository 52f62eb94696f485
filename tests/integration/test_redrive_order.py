"""Re-driving a dead letter never applies an entry out of order over later ones of the same
row (found in review of issue 14): an older reactivation must not undo a newer suspension, and
an update whose row's creation was dead-lettered is not a silent no-op. A rebuild or re-drive
that rewrites rows below the tracking position reaches the API processes' caches."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.caches import KeyCache
from adapters.maintenance import rebuild, redrive
from adapters.projector import Projector
from domain.organisation import Organisation, OrganisationSettings
from infra.wiring import Runtime
from projections import catalogue as catalogue_model
from projections import organisations
from projections.base import ReadModel
from tests.conftest import tracked, wait_until
from tests.integration.helpers import pipeline, service
from tests.integration.test_dead_letters import RETRIES, _poisoned
from tests.integration.test_key_cache import access, catalogue

pytestmark = pytest.mark.anyio


def _poisoned_reactivation() -> ReadModel:
    def fail(cur: Any, event: Any, position: int) -> None:
        raise ValueError("cannot project this reactivation")

    return ReadModel(
        name=organisations.NAME, ddl=organisations.DDL, tables=organisations.READ_MODEL.tables,
        handlers={**organisations.READ_MODEL.handlers, Organisation.Reactivated: fail})


async def _project(runtime: Runtime, model: ReadModel) -> Projector:
    """Relay and project `model` until it has passed the ledger head; returns the projector."""
    async with pipeline(runtime, model, RETRIES) as projector:
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= head, "projector past it")
    return projector


def _suspended(runtime: Runtime, org: Any) -> bool:
    with runtime.pool.connection() as conn:
        row = organisations.get(conn, org)
    assert row is not None
    return bool(row.suspended)


async def test_an_update_of_a_row_whose_creation_was_dead_lettered_is_dead_lettered_too(
    runtime: Runtime,
) -> None:
    svc = service(runtime)
    poison = svc.create(OrganisationSettings(name="poison", billing_email="p@b.in"), actor=None)
    svc.update_settings(poison.aggregate.id, OrganisationSettings(), suspended=True, reason="fraud",
                        actor=None)
    projector = await _project(runtime, _poisoned(broken=True))
    assert projector.dead_lettered == 2  # the creation, and the suspension it makes impossible
    fixed = redrive(runtime.pool, runtime.ledger, organisations.READ_MODEL)
    assert len(fixed.applied) == 2 and not fixed.still_failing
    assert _suspended(runtime, poison.aggregate.id)  # as the ledger says


async def test_redriving_an_older_reactivation_never_undoes_a_later_suspension(runtime: Runtime) -> None:
    svc = service(runtime)
    org = svc.create(OrganisationSettings(name="acme", billing_email="p@b.in"), actor=None).aggregate.id
    svc.update_settings(org, OrganisationSettings(), suspended=True, reason="late payment", actor=None)
    svc.update_settings(org, OrganisationSettings(), suspended=False, reason="paid",
                        actor=None)  # dead-lettered
    svc.update_settings(org, OrganisationSettings(), suspended=True, reason="fraud", actor=None)  # applied
    projector = await _project(runtime, _poisoned_reactivation())
    assert projector.dead_lettered == 1 and _suspended(runtime, org)
    redrive(runtime.pool, runtime.ledger, organisations.READ_MODEL)
    assert runtime.ledger.get(org, Organisation).suspended
    assert _suspended(runtime, org)


async def test_a_rebuild_that_rewrites_rows_reaches_the_key_cache(runtime: Runtime) -> None:
    svc = service(runtime)
    org = svc.create(OrganisationSettings(name="acme", billing_email="p@b.in"), actor=None).aggregate.id
    cat = catalogue(runtime)
    project = cat.create_project(org, "p", actor=None).aggregate.id
    key, _ = access(runtime).issue_key(project, "k", None, actor=None)
    svc.update_settings(org, OrganisationSettings(), suspended=True, reason="fraud", actor=None)
    rebuild(runtime.pool, runtime.ledger, organisations.READ_MODEL)
    rebuild(runtime.pool, runtime.ledger, catalogue_model.READ_MODEL)
    with runtime.pool.connection() as conn:  # drift that moves no position (a hand edit, a bug)
        conn.execute("UPDATE organisations SET suspended = false WHERE id = %s", (org,))
    cache = KeyCache(runtime.pool)
    cache.refresh()
    record = await cache.find(key.aggregate.prefix)
    assert record is not None and not record.suspended
    rebuild(runtime.pool, runtime.ledger, organisations.READ_MODEL)  # the operator repairs it
    cache.refresh()
    record = await cache.find(key.aggregate.prefix)
    assert record is not None and record.suspended
