"""A handler that always fails: bounded retries, then the DLQ; later messages still flow."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters import bookkeeping
from adapters.bus import decode_dead_letter
from adapters.maintenance import redrive
from adapters.projector import Projector
from adapters.relay import Relay
from domain.organisation import Organisation
from infra.wiring import Runtime
from projections import organisations
from projections.base import ReadModel
from tests.conftest import close_nats, tracked, wait_until
from tests.integration.helpers import org_rows, service

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
        svc.create({"name": "before", "billing_email": "a@b.in"})
        poison = svc.create({"name": "poison", "billing_email": "p@b.in"})
        for i in range(5):
            svc.create({"name": f"after-{i}", "billing_email": "a@b.in"})
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
