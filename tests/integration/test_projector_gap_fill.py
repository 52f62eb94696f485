"""A long stream gap (stream retention, a re-created consumer, a relay that skipped ahead) is
filled from the ledger in bounded chunks, each committed with its tracking: the memory it takes
does not grow with the gap, and progress survives a crash half way."""

from __future__ import annotations

import asyncio
import resource
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from nats.js import JetStreamContext

from adapters.projector import GAP_FILL_CHUNK_ROWS, Projector
from adapters.relay import Relay
from adapters.usage_writer import encode_batch
from domain.records import KeyRecord
from domain.services.catalogue import CatalogueService
from domain.usage import UsageBatch, UsageFact
from infra.wiring import Runtime
from projections import usage_totals
from tests.conftest import ThreadedWriter, close_nats, threaded_writer, tracked, wait_until

pytestmark = pytest.mark.anyio

SMALL_GAP_ENTRIES = 20_000
LARGE_GAP_ENTRIES = 200_000
APPEND_ROWS = 10_000  # per writer call
FILL_DEADLINE_S = 60.0
# Flat: the large gap may raise memory by this much more than the small one at most (a chunk's
# worth of decoded entries is what both hold; the rest is noise of the event loop and pools).
# Holding a 200k gap at once raised it by over 130 MB.
PEAK_GROWTH_MAX_BYTES = 32 * 1024 * 1024

KEY = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
NOW = datetime.now(UTC)


async def _append(writer: ThreadedWriter, start: int, count: int) -> int:
    position = 0
    for offset in range(start, start + count, APPEND_ROWS):
        facts = [UsageFact(f"e{i}", "n", Decimal(1), NOW, {})
                 for i in range(offset, min(offset + APPEND_ROWS, start + count))]
        ids, states = encode_batch(KEY, UsageBatch.of(facts), NOW)
        rows = [(UUID(bytes=i), state) for i, state in zip(ids, states, strict=True)]
        position = (await asyncio.wrap_future(writer.submit(rows))).position
    return position


def _relay_skips_to(rt: Runtime, position: int) -> None:
    """What a stream gap looks like to a projector: the relay goes on after `position` as
    though everything before it had been delivered (the messages expired, or were never sent)."""
    with rt.pool.connection() as conn, conn.transaction():
        updated = conn.execute("UPDATE relay_positions SET position = %s", (position,)).rowcount
    assert updated == 3  # the relay's own row and one per lane


async def _relay_until_tracked(rt: Runtime, js: JetStreamContext, position: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, js, rt.streams).run(stop))
    try:
        await wait_until(lambda: tracked(rt, usage_totals.NAME) >= position, "relayed")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def _fill_a_gap(rt: Runtime, js: JetStreamContext, writer: ThreadedWriter, start: int,
                      entries: int) -> tuple[int, set[int]]:
    """Append `entries` usage entries the relay never sends, then one it does: the projector
    fills the gap from the ledger. Returns how far this process's memory rose above where it
    was while it did (sampled at every poll), and the tracking positions seen on the way.

    Resident memory, not tracemalloc: tracing every allocation made the fill four times slower.
    Memory the allocator keeps after one fill is reused by the next, so a fill that holds only
    a chunk at a time raises it little, and one that holds the whole gap raises it by far more
    than PEAK_GROWTH_MAX_BYTES."""
    before = tracked(rt, usage_totals.NAME)
    gap_end = await _append(writer, start, entries)
    _relay_skips_to(rt, gap_end)
    stop = asyncio.Event()
    relay = Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, js, rt.streams)
    seen: set[int] = set()
    baseline = peak = _rss_bytes()

    def reached(target: int) -> bool:
        nonlocal peak
        peak = max(peak, _rss_bytes())
        position = tracked(rt, usage_totals.NAME)
        seen.add(position)
        return position >= target

    task = asyncio.create_task(relay.run(stop))
    try:
        last = await _append(writer, start + entries, 1)
        await wait_until(lambda: reached(last), "the gap filled", FILL_DEADLINE_S)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return peak - baseline, {p for p in seen if before < p < gap_end}


async def test_a_long_gap_is_filled_in_bounded_chunks_with_flat_memory(runtime: Runtime) -> None:
    svc = CatalogueService(runtime.ledger, lambda: datetime.now(UTC), uuid4)
    defined, _ = svc.define_meter(code="n", name="n", aggregation="count", field=None, group_by=[],
                                  allow_negative=False, has_usage=lambda _: False, actor=None)
    js = await runtime.connect_nats("projector")
    stop = asyncio.Event()
    projector = Projector(usage_totals.READ_MODEL, runtime.ledger, runtime.projection_pool(), js,
                          runtime.streams)
    task = asyncio.create_task(projector.run(stop))
    try:
        await _relay_until_tracked(runtime, js, defined.position)  # the relay's rows exist
        with threaded_writer(runtime) as writer:
            small_rise, _ = await _fill_a_gap(runtime, js, writer, 0, SMALL_GAP_ENTRIES)
            large_rise, on_the_way = await _fill_a_gap(runtime, js, writer, SMALL_GAP_ENTRIES + 1,
                                                       LARGE_GAP_ENTRIES)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await close_nats(runtime)

    assert large_rise - small_rise < PEAK_GROWTH_MAX_BYTES, (small_rise, large_rise)
    # Progress committed as it went: tracking seen between the gap's ends, more than once.
    assert len(on_the_way) > 1, on_the_way
    assert LARGE_GAP_ENTRIES // GAP_FILL_CHUNK_ROWS > 1
    with runtime.pool.connection() as conn:
        row = conn.execute("SELECT sum(count) FROM usage_totals WHERE granularity = 'month'"
                           " AND project_id = %s", (KEY.project_id,)).fetchone()
    assert row is not None and row[0] == SMALL_GAP_ENTRIES + LARGE_GAP_ENTRIES + 2
    assert projector.dead_lettered == 0
