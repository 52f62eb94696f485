"""Ledger -> relay -> JetStream -> projector -> read model, on real Postgres and NATS."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.utils import get_topic
from nats.js.api import AckPolicy, ConsumerConfig

from adapters.bus import (
    DOMAIN_LANE,
    ENTRIES_FORMAT,
    FORMAT_HEADER,
    LANE_PREV_HEADER,
    PREV_HEADER,
    TOPIC_HEADER,
    Entry,
    RelayedBatch,
    encode,
    entries_decoder,
)
from adapters.projector import Projector
from adapters.relay import ENTRIES_PER_MESSAGE_MAX, Message, Relay
from adapters.usage_writer import UsageWriter, encode_usage
from domain.records import KeyRecord
from domain.usage import Usage, UsageFact
from infra.wiring import Runtime
from projections import organisations
from tests.conftest import close_nats, running, tracked, wait_until
from tests.integration.helpers import org_rows, rebuilt_rows, write_orgs

pytestmark = pytest.mark.anyio
KILL_WAIT_S = 15.0
BACKLOG_READ_INTERVAL_S = 600.0  # far beyond any wait in these tests


def _tracked_beyond(runtime: Runtime, name: str, position: int) -> bool:
    return tracked(runtime, name) > position

async def test_a_write_travels_to_the_read_model(runtime: Runtime) -> None:
    async with running(runtime, {"relay", "project"}):
        ids = await asyncio.to_thread(write_orgs, runtime, 3)
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "projection")
    rows = org_rows(runtime)
    assert {r[0] for r in rows} == set(ids)
    assert sorted(r[1] for r in rows) == ["org-0", "org-1-renamed", "org-2"]


async def test_killed_projector_resumes_and_equals_a_fresh_rebuild(runtime: Runtime) -> None:
    js = await runtime.connect_nats("test")
    relay_stop = asyncio.Event()
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                  runtime.streams)
    relay_task = asyncio.create_task(relay.run(relay_stop))
    writer = asyncio.create_task(asyncio.to_thread(write_orgs, runtime, 120))
    try:
        for _ in range(3):  # kill the projector mid-stream, three times
            stop = asyncio.Event()
            projector = Projector(organisations.READ_MODEL, runtime.ledger, runtime.projection_pool(), js,
                                  runtime.streams)
            task = asyncio.create_task(projector.run(stop))
            before = tracked(runtime, "organisations")
            await wait_until(partial(_tracked_beyond, runtime, "organisations", before), "progress")
            # No graceful stop: whatever was in flight is redelivered. (stop too: nats-py's fetch
            # can absorb a cancellation, and the loop must end all the same.)
            task.cancel()
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), KILL_WAIT_S)
        await writer
        head = runtime.ledger.head()
        stop = asyncio.Event()
        projector = Projector(organisations.READ_MODEL, runtime.ledger, runtime.projection_pool(), js,
                              runtime.streams)
        task = asyncio.create_task(projector.run(stop))
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "catch-up")
        stop.set()
        await asyncio.wait_for(task, KILL_WAIT_S)
    finally:
        relay_stop.set()
        await asyncio.wait_for(relay_task, KILL_WAIT_S)
        await close_nats(runtime)
    live = org_rows(runtime)
    assert len(live) == 120
    assert live == rebuilt_rows(runtime)


async def test_redelivered_and_reordered_messages_skip_nothing(runtime: Runtime) -> None:
    """Several messages in flight, forced redeliveries (nak), out-of-order handling."""
    js = await runtime.connect_nats("test")
    relay_stop = asyncio.Event()
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                  runtime.streams)
    relay_task = asyncio.create_task(relay.run(relay_stop))
    try:
        await asyncio.to_thread(write_orgs, runtime, 40)
        head = runtime.ledger.head()
        deadline = asyncio.get_running_loop().time() + 20
        while (await js.stream_info(runtime.streams.ledger)).state.last_seq == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        sub = await js.pull_subscribe(
            runtime.streams.ledger_wildcard, durable="chaos", stream=runtime.streams.ledger,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=50,
                                  max_ack_pending=1000),
        )
        projector = Projector(organisations.READ_MODEL, runtime.ledger, runtime.projection_pool(), js,
                              runtime.streams)
        rng = random.Random(7)
        handled_out_of_order = False
        while tracked(runtime, "organisations") < head:
            msgs = await sub.fetch(8, timeout=5)
            rng.shuffle(msgs)
            keep, redeliver = msgs[: len(msgs) // 2 + 1], msgs[len(msgs) // 2 + 1:]
            for m in redeliver:
                await m.nak()  # forced redelivery, after later messages were handled
            if len(keep) > 1:
                first = keep[0].metadata.sequence.stream
                handled_out_of_order |= any(m.metadata.sequence.stream < first for m in keep)
            await projector.handle(keep)
            await projector.handle(keep[:1])  # and a plain duplicate
        assert handled_out_of_order
        assert projector.dead_lettered == 0
    finally:
        relay_stop.set()
        await asyncio.wait_for(relay_task, KILL_WAIT_S)
        await close_nats(runtime)
    live = org_rows(runtime)
    assert len(live) == 40
    assert sum(1 for r in live if r[1].endswith("renamed")) == 20
    assert live == rebuilt_rows(runtime)


async def test_messages_of_ignored_topics_advance_tracking_without_being_applied(
    runtime: Runtime,
) -> None:
    """Interleaved meters (ignored by the organisations model) and organisations: the model
    reaches the ledger head, equal to a rebuild, whatever was skipped in memory."""
    from domain.services.catalogue import CatalogueService

    catalogue = CatalogueService(runtime.ledger, lambda: datetime.now(UTC), uuid4)
    async with running(runtime, {"relay", "project"}):
        for i in range(6):
            await asyncio.to_thread(write_orgs, runtime, 2, f"mixed{i}")
            for j in range(3):
                await asyncio.to_thread(catalogue.define_meter, code=f"m{i}x{j}", name="m",
                                        aggregation="count", field=None, group_by=[],
                                        allow_negative=False, has_usage=lambda _: False, actor=None)
        head = runtime.ledger.head()  # the newest entries are meters: ignored by this model
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "skips persisted")
    live = org_rows(runtime)
    assert len(live) == 12
    assert live == rebuilt_rows(runtime)


async def test_a_domain_model_consumes_no_usage_yet_its_tracking_reaches_the_head(
    runtime: Runtime,
) -> None:
    """Usage travels in its own lane; models that ignore usage do not receive it, and the
    relay's watermarks still bring them to the ledger head when the newest entries are usage."""
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    async with running(runtime, {"relay", "project"}):
        await asyncio.to_thread(write_orgs, runtime, 2)
        writer = UsageWriter(runtime.database_url, runtime.settings.pg_schema)
        try:
            for i in range(5):
                await writer.append([encode_usage(
                    key, UsageFact(f"e{i}", "calls", Decimal(1), now, {}), now)])
        finally:
            await writer.stop()
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "watermark")
        await wait_until(lambda: tracked(runtime, "usage_totals") >= head, "usage applied")
        assert runtime.js is not None
        info = await runtime.js.consumer_info(
            runtime.streams.ledger, runtime.streams.consumer("organisations"))
    assert info.config.filter_subject == runtime.streams.lane_wildcard(DOMAIN_LANE)
    assert len(org_rows(runtime)) == 2


async def test_the_relay_sends_every_entry_as_the_ledger_holds_it(runtime: Runtime) -> None:
    """Postgres encodes each entry for the wire (bus.ENTRY_SQL); decoded, the messages hold the
    ledger's rows exactly: in order, one topic per message, each state byte for byte."""
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    await asyncio.to_thread(write_orgs, runtime, 2)
    writer = UsageWriter(runtime.database_url, runtime.settings.pg_schema)
    try:
        await writer.append([encode_usage(key, UsageFact(f"e{i}", "calls", Decimal(i), now,
                                                         {"k": "v"}), now) for i in range(5)])
    finally:
        await writer.stop()
    last_org = runtime.ledger.head() - 5
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema,
                  None, runtime.streams)  # type: ignore[arg-type]  # reads only
    async with await psycopg.AsyncConnection.connect(
            runtime.database_url, options=f"-c search_path={runtime.settings.pg_schema}") as conn:
        mixed, _ = await relay.read_messages(conn, 0, {})  # read entry by entry, grouped here
        (usage,), _ = await relay.read_messages(conn, last_org, {})  # aggregated by Postgres
    assert usage.count == 5 and usage.topic == get_topic(Usage.Recorded)

    def relayed(messages: list[Message]) -> list[tuple[object, ...]]:
        return [(m.topic, e.position, e.originator_id, e.originator_version, bytes(e.state))
                for m in messages for e in entries_decoder(None).decode(m.body)]

    stored = [(n.topic, n.id, n.originator_id, n.originator_version, n.state)
              for n in runtime.ledger.read_after(0, 1000)]
    assert relayed(mixed) == stored
    assert relayed([usage]) == stored[-5:]
    assert [m.topic for m in mixed].count(get_topic(Usage.Recorded)) == 1
    assert [(m.first, m.last, m.prev) for m in mixed][-1] == (last_org + 1, last_org + 5, last_org)


async def test_a_backlog_is_relayed_read_after_read_without_the_read_interval(
    runtime: Runtime,
) -> None:
    """Reads under load are spaced by the read interval; a read that comes back full means a
    backlog, and the next one goes at once. Here the interval is longer than the test's
    deadline: relaying four reads' worth of entries in time proves the reads did not wait."""
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    writer = UsageWriter(runtime.database_url, runtime.settings.pg_schema)
    try:
        await writer.append([encode_usage(key, UsageFact(f"e{i}", "calls", Decimal(1), now, {}),
                                          now) for i in range(3500)])
    finally:
        await writer.stop()
    head = runtime.ledger.head()
    js = await runtime.connect_nats("test")
    relay = Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                  runtime.streams, read_interval_s=BACKLOG_READ_INTERVAL_S,
                  read_batch_rows=ENTRIES_PER_MESSAGE_MAX)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: relay.published_entries >= head, "the backlog relayed")
    finally:
        stop.set()
        await asyncio.wait_for(task, KILL_WAIT_S)
        await close_nats(runtime)
    assert relay.published_entries == head
    assert relay.published_messages == -(-head // ENTRIES_PER_MESSAGE_MAX)  # full messages


async def _project_crafted(runtime: Runtime, body: bytes, headers: dict[str, str]) -> Projector:
    """Publish one hand-made message to the ledger stream and let a projector take it."""
    js = await runtime.connect_nats("test")
    await js.publish(runtime.streams.ledger_subject(headers[TOPIC_HEADER]), body,
                     stream=runtime.streams.ledger, headers=headers)
    projector = Projector(organisations.READ_MODEL, runtime.ledger, runtime.projection_pool(), js,
                          runtime.streams)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        head = runtime.ledger.head()
        await wait_until(lambda: tracked(runtime, "organisations") >= head, "the crafted message")
    finally:
        stop.set()
        await asyncio.wait_for(task, KILL_WAIT_S)
        await close_nats(runtime)
    return projector


async def test_a_message_whose_body_will_not_decode_is_read_from_the_ledger(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    (org,) = await asyncio.to_thread(write_orgs, runtime, 1)
    head = runtime.ledger.head()
    (note,) = runtime.ledger.read_after(head - 1, 1)
    projector = await _project_crafted(runtime, b"\xc1 not msgpack", {
        "Nats-Msg-Id": f"{head}-{head}", PREV_HEADER: str(head - 1), LANE_PREV_HEADER: "0",
        TOPIC_HEADER: note.topic, FORMAT_HEADER: ENTRIES_FORMAT})
    assert [r[0] for r in org_rows(runtime)] == [org]
    assert "cannot decode message" in caplog.text and projector.dead_lettered == 0
    assert org_rows(runtime) == rebuilt_rows(runtime)


async def test_a_message_of_the_first_wire_format_is_still_applied(runtime: Runtime) -> None:
    (org,) = await asyncio.to_thread(write_orgs, runtime, 1)
    head = runtime.ledger.head()
    (note,) = runtime.ledger.read_after(head - 1, 1)
    assert isinstance(note.originator_id, UUID)
    entry = Entry(note.id, note.originator_id, note.originator_version, note.topic, note.state)
    await _project_crafted(runtime, encode(RelayedBatch(head - 1, [entry])), {
        "Nats-Msg-Id": f"{head}-{head}", PREV_HEADER: str(head - 1), TOPIC_HEADER: note.topic})
    assert [r[0] for r in org_rows(runtime)] == [org]
