"""The tracking row never moves past an entry the read model has not applied: not on the skip
path (watermarks and ignored topics, advanced in memory and flushed), and not by a rebuild that
races an append."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

import pytest

from adapters.maintenance import rebuild
from adapters.projector import Projector
from adapters.usage_writer import encode_usage
from domain.organisation import OrganisationSettings
from domain.records import KeyRecord
from domain.usage import UsageFact
from infra.wiring import Runtime
from projections import organisations
from tests.conftest import threaded_writer, tracked, wait_sync, wait_until
from tests.integration.helpers import org_rows, pipeline, rebuilt_rows, service, write_orgs

REBUILD_RESULT_TIMEOUT_S = 30


def _waiting_for_the_tracking_lock(rt: Runtime) -> bool:
    """Whether one statement on projection_tracking waits for a lock held by another."""
    with rt.pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s",
            ("%projection_tracking%",)).fetchone()
        return row is not None and int(row[0]) == 1


def organisations_pipeline(runtime: Runtime) -> contextlib.AbstractAsyncContextManager[Projector]:
    """A relay and the organisations projector, running for the block."""
    return pipeline(runtime, organisations.READ_MODEL)


@pytest.mark.anyio
async def test_a_watermark_after_tracking_fell_back_fills_the_gap_from_the_ledger(
    runtime: Runtime,
) -> None:
    """A Postgres crash can lose projector commits made without waiting for the WAL flush,
    after their messages were acked: the stored tracking is then below what the projector
    remembers. The next watermark (a skip-only message) must not carry tracking over them."""
    async with organisations_pipeline(runtime) as projector:
        write_orgs(runtime, 3, prefix="early")
        kept = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= kept, "early orgs")
        write_orgs(runtime, 4, prefix="late")
        applied = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= applied, "late orgs")
        assert len(org_rows(runtime)) == 7

        # The crash: the commits after `kept` are gone, rows and tracking alike. It commits
        # once the flush of the watermark below waits for it, so that the skip path (not the
        # idle projector's check) is what meets the row gone back.
        key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
        now = datetime.now(UTC)
        with runtime.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT 1 FROM projection_tracking WHERE name = %s FOR UPDATE",
                         (organisations.NAME,))
            conn.execute("DELETE FROM organisations WHERE name LIKE 'late-%%'")
            conn.execute("UPDATE projection_tracking SET position = %s WHERE name = %s",
                         (kept, organisations.NAME))
            # Usage only: the domain lane gets a watermark, which the organisations model skips.
            with threaded_writer(runtime) as writer:
                fact = UsageFact("e1", "m", Decimal(1), now, {})
                usage = await asyncio.wrap_future(writer.submit([encode_usage(key, fact, now)]))
            await wait_until(lambda: _waiting_for_the_tracking_lock(runtime),
                             "the watermark's flush at the tracking row")
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= usage.position,
                         "the watermark past the usage entry")
        live = sorted(r[1] for r in org_rows(runtime))

    assert live == sorted(r[1] for r in rebuilt_rows(runtime))
    assert [n for n in live if n.startswith("late-")] == [
        "late-0", "late-1-renamed", "late-2", "late-3-renamed"]
    assert projector.dead_lettered == 0


@pytest.mark.anyio
async def test_an_idle_projector_fills_tracking_that_fell_back_from_the_ledger(
    runtime: Runtime,
) -> None:
    """Lost commits while nothing else happens: JetStream drops the relay's resends as
    duplicates, so no message would bring them back; the idle projector does."""
    async with organisations_pipeline(runtime):
        write_orgs(runtime, 4)
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= head, "orgs")
        with runtime.pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM organisations")
            conn.execute("UPDATE projection_tracking SET position = 0 WHERE name = %s",
                         (organisations.NAME,))
        await wait_until(lambda: len(org_rows(runtime)) == 4, "the lost rows filled again")
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= head, "tracking again")
        live = org_rows(runtime)
    assert live == rebuilt_rows(runtime)




def test_rebuild_reads_the_head_after_taking_the_tracking_lock(runtime: Runtime) -> None:
    """A projector commit that lands while a rebuild waits for the tracking lock is part of the
    ledger the rebuild replays: the rebuilt model has it, and tracking does not go back."""
    write_orgs(runtime, 3)
    rebuild(runtime.pool, runtime.ledger, organisations.READ_MODEL)
    before = runtime.ledger.head()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A projector's transaction: it holds the tracking lock while it applies an entry.
        with runtime.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT position FROM projection_tracking WHERE name = %s FOR UPDATE",
                        (organisations.NAME,))
            rebuilt = pool.submit(rebuild, runtime.pool, runtime.ledger, organisations.READ_MODEL)
            wait_sync(lambda: _waiting_for_the_tracking_lock(runtime), "the rebuild at the lock")
            appended = service(runtime).create(
                OrganisationSettings(name="concurrent", billing_email="c@b.in"), actor=None)
            for n in runtime.ledger.read_after(before, 100):
                organisations.READ_MODEL.apply_all(cur, [(runtime.ledger.decode(n), n.id)])
            cur.execute("UPDATE projection_tracking SET position = %s WHERE name = %s",
                        (appended.position, organisations.NAME))
        position = rebuilt.result(REBUILD_RESULT_TIMEOUT_S)

    assert position == runtime.ledger.head() == appended.position
    assert tracked(runtime, organisations.NAME) == appended.position
    assert "concurrent" in {r[1] for r in org_rows(runtime)}


@pytest.mark.anyio
async def test_a_restarted_projector_fills_commits_lost_with_the_crash_from_the_ledger(
    runtime: Runtime,
) -> None:
    """Found in review: Postgres loses a projector's last commits and the worker restarts too.
    The messages were acked, JetStream drops the relay's resends, and a fresh process has no
    memory of what it wrote: without a check against the ledger head, the lost entries (a
    revocation, say) stay missing until some other write reaches the ledger."""
    async with organisations_pipeline(runtime):
        write_orgs(runtime, 4)
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= head, "orgs")
    with runtime.pool.connection() as conn, conn.transaction():  # the crash lost them
        conn.execute("DELETE FROM organisations")
        conn.execute("UPDATE projection_tracking SET position = 0 WHERE name = %s",
                     (organisations.NAME,))
    async with organisations_pipeline(runtime):  # a new process; nothing new is written
        await wait_until(lambda: len(org_rows(runtime)) == 4, "the lost rows filled again")
        await wait_until(lambda: tracked(runtime, organisations.NAME) >= head, "tracking again")
    assert org_rows(runtime) == rebuilt_rows(runtime)
