"""A handler that always fails: bounded retries, then the DLQ; later messages still flow. A
re-drive applies each dead letter once, however many run at the same time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import uuid4

import pytest

from adapters import bookkeeping
from adapters.bus import decode_dead_letter
from adapters.maintenance import RedriveResult, rebuild, redrive
from adapters.projector import Projector
from adapters.relay import Relay
from adapters.usage_writer import encode_usage
from domain.organisation import Organisation, OrganisationSettings
from domain.records import KeyRecord
from domain.services.catalogue import CatalogueService
from domain.usage import UsageFact
from infra.wiring import Runtime
from projections import organisations, usage_totals
from projections.base import ReadModel
from tests.conftest import close_nats, table_rows, threaded_writer, tracked, wait_until
from tests.integration.helpers import org_rows, pipeline, service

pytestmark = pytest.mark.anyio
RETRIES = (0.01, 0.02, 0.04)


def _poisoned(broken: bool) -> ReadModel:
    created = organisations.READ_MODEL.handlers[Organisation.Created]

    def maybe_fail(cur: Any, event: Any, position: int) -> None:
        if broken and event.name == "poison":
            raise ValueError("cannot project poison")
        created(cur, event, position)

    return ReadModel(
        name=organisations.NAME, ddl=organisations.DDL, tables=organisations.READ_MODEL.tables,
        handlers={**organisations.READ_MODEL.handlers, Organisation.Created: maybe_fail},
    )


async def test_failing_handler_dead_letters_after_bounded_retries_and_carries_on(
    runtime: Runtime,
) -> None:
    js = await runtime.connect_nats("test")
    stop = asyncio.Event()
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                  runtime.streams)
    projector = Projector(_poisoned(broken=True), runtime.ledger, runtime.projection_pool(), js,
                          runtime.streams, retry_backoff_s=RETRIES)
    tasks = [asyncio.create_task(relay.run(stop)), asyncio.create_task(projector.run(stop))]
    try:
        svc = service(runtime)
        svc.create(OrganisationSettings(name="before", billing_email="a@b.in"), actor=None)
        poison = svc.create(OrganisationSettings(name="poison", billing_email="p@b.in"), actor=None)
        for i in range(5):
            svc.create(OrganisationSettings(name=f"after-{i}", billing_email="a@b.in"), actor=None)
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "projector past poison")

        sub = await js.pull_subscribe(runtime.streams.dlq_wildcard, durable="inspect",
                                      stream=runtime.streams.dlq)
        (msg,) = await sub.fetch(1, timeout=5)
        letter = decode_dead_letter(msg.data)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await close_nats(runtime)

    assert letter.position == poison.position
    assert letter.attempts == len(RETRIES) + 1
    assert "cannot project poison" in letter.error
    assert projector.dead_lettered == 1
    names = sorted(r[1] for r in org_rows(runtime))
    assert names == ["after-0", "after-1", "after-2", "after-3", "after-4", "before"]
    with runtime.pool.connection() as conn:
        missing = bookkeeping.dead_letters(conn, "organisations")
        assert [m["position"] for m in missing] == [poison.position]
        assert bookkeeping.dead_letter_counts(conn) == {"organisations": 1}

    # Still broken: a re-drive keeps it on the list.
    again = redrive(runtime.pool, runtime.ledger, _poisoned(broken=True))
    assert again.applied == [] and list(again.still_failing) == [poison.position]
    # Fixed: the re-drive applies it from the ledger and clears the record.
    fixed = redrive(runtime.pool, runtime.ledger, organisations.READ_MODEL)
    assert fixed.applied == [poison.position]
    assert "poison" in {r[1] for r in org_rows(runtime)}
    with runtime.pool.connection() as conn:
        assert bookkeeping.dead_letters(conn, "organisations") == []


POISON = "13"  # the value of the usage entries the poisoned model cannot apply
CONCURRENT_REDRIVES = 4
REDRIVE_TIMEOUT_S = 60
USAGE_ORDERS = {
    "usage_totals": "organisation_id, metric, granularity, period_start, project_id, group_key",
    "usage_unique": "organisation_id, metric, granularity, period_start, project_id, value",
    "usage_meters": "code"}


def _poisoned_usage() -> ReadModel:
    model = usage_totals.READ_MODEL
    assert model.batch is not None
    apply_batch = model.batch

    def maybe_fail(cur: Any, items: list[tuple[Any, int]]) -> None:
        if any(str(getattr(event, "value", "")) == POISON for event, _ in items):
            raise ValueError("cannot project poison usage")
        apply_batch(cur, items)

    return ReadModel(name=model.name, ddl=model.ddl, tables=model.tables,
                     handlers=model.handlers, batch=maybe_fail, views=model.views)


def _usage_tables(rt: Runtime) -> dict[str, list[tuple[Any, ...]]]:
    return {t: table_rows(rt, t, order) for t, order in USAGE_ORDERS.items()}


async def test_concurrent_redrives_apply_each_dead_lettered_usage_entry_exactly_once(
    runtime: Runtime,
) -> None:
    svc = CatalogueService(runtime.ledger, lambda: datetime.now(UTC), uuid4)
    for code, aggregation in (("s", "sum"), ("n", "count")):
        svc.define_meter(code=code, name=code, aggregation=aggregation, field=None, group_by=[],
                         allow_negative=False, has_usage=lambda _: False, actor=None)
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    poisoned: list[int] = []
    async with pipeline(runtime, _poisoned_usage(), RETRIES) as projector:
        with threaded_writer(runtime) as writer:
            for i in range(24):
                value = POISON if i % 3 == 0 else str(i + 20)
                rows = [encode_usage(key, UsageFact(f"e{i}-{m}", m, Decimal(value), now, {}), now)
                        for m in ("s", "n")]
                written = await asyncio.wrap_future(writer.submit(rows))
                if value == POISON:
                    poisoned += [written.position - 1, written.position]
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, usage_totals.NAME) >= head, "past the poison")
    assert projector.dead_lettered == len(poisoned) == 16
    with runtime.pool.connection() as conn:
        assert [m["position"] for m in bookkeeping.dead_letters(conn, usage_totals.NAME)] == poisoned

    # Fixed, and re-driven by several operators at once.
    start = threading.Barrier(CONCURRENT_REDRIVES)

    def one_redrive() -> RedriveResult:
        start.wait(REDRIVE_TIMEOUT_S)
        return redrive(runtime.pool, runtime.ledger, usage_totals.READ_MODEL)

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_REDRIVES) as pool:
        runs = [pool.submit(one_redrive) for _ in range(CONCURRENT_REDRIVES)]
        results = [run.result(REDRIVE_TIMEOUT_S) for run in runs]

    assert sorted(p for r in results for p in r.applied) == poisoned  # each once, all of them
    assert all(not r.still_failing for r in results)
    with runtime.pool.connection() as conn:
        assert bookkeeping.dead_letters(conn, usage_totals.NAME) == []
    live = _usage_tables(runtime)
    rebuild(runtime.pool, runtime.ledger, usage_totals.READ_MODEL)
    assert live == _usage_tables(runtime)
    # And a re-drive after them finds nothing left to apply.
    assert redrive(runtime.pool, runtime.ledger, usage_totals.READ_MODEL).applied == []
