"""The relay (outbox): publishes the ledger, in order, to the JetStream LEDGER stream.

One relay is active at a time (a Postgres advisory lock); others wait as hot standbys. It wakes
on the ledger's NOTIFY and also polls, because a lost NOTIFY must not stall it
(docs/ARCHITECTURE.md, What the libraries do). Its position is saved only after JetStream
acknowledged every message up to it, and each message's Nats-Msg-Id is its ledger position
range, so re-publishing after a crash is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, groupby
from operator import itemgetter
from typing import Any

import psycopg
from nats.js import JetStreamContext
from psycopg import sql

from adapters.bookkeeping import lock_key, relay_position
from adapters.bus import (
    ENTRIES_FORMAT,
    ENTRY_SQL,
    FORMAT_HEADER,
    LANE_HEADER,
    LANE_PREV_HEADER,
    LANES,
    LAST_HEADER,
    MAX_MESSAGE_BYTES,
    PREV_HEADER,
    TOPIC_HEADER,
    WATERMARK,
    Streams,
    entries_body,
    entries_header,
    lane_of,
)
from adapters.ledger import LedgerStore

log = logging.getLogger("billing.relay")

READ_BATCH_ROWS = 5000
ENTRIES_PER_MESSAGE_MAX = 1000
POLL_INTERVAL_S = 0.5
READ_INTERVAL_S = 0.025
MARK_INTERVAL_S = 0.1  # under load, a quiet lane hears of the head this often
POSITION_SAVE_INTERVAL_S = 0.25  # under load; at once when idle
STANDBY_POLL_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DB_CONNECT_TIMEOUT_S = 5
RELAY_NAME = "relay"


Row = tuple[int, str, bytes]  # (position, topic, the entry's bytes: bus.ENTRY_SQL)


@dataclass(frozen=True)
class Message:
    """One relayed message: consecutive ledger entries of one topic."""

    topic: str
    first: int
    last: int
    prev: int  # the ledger position before `first`
    lane_prev: int  # the last position of the lane's previous message
    count: int  # entries
    body: bytes  # an entries-v2 body (bus.entries_body)


_position, _topic, _entry = itemgetter(0), itemgetter(1), itemgetter(2)


def group_messages(
    rows: Sequence[Row], prev: int, lane_last: dict[str, int]
) -> tuple[list[Message], dict[str, int]]:
    """Consecutive entries of one topic share a message, bounded in count and bytes. Each
    message names `prev` and its lane's prev; returns the lanes' last positions after them.
    Work per message, not per entry: the page comes from Postgres with each entry's bytes."""
    messages: list[Message] = []
    lanes = dict(lane_last)
    for topic, run_rows in groupby(rows, key=_topic):
        run = list(run_rows)
        entries = list(map(_entry, run))
        ends = list(accumulate(map(len, entries)))  # bytes up to and including each entry
        lane = lane_of(topic)
        start = 0
        while start < len(run):
            before = ends[start - 1] if start else 0
            fits = bisect_right(ends, before + MAX_MESSAGE_BYTES, lo=start)
            stop = min(start + ENTRIES_PER_MESSAGE_MAX, max(fits, start + 1))
            messages.append(Message(topic, _position(run[start]), _position(run[stop - 1]),
                                    messages[-1].last if messages else prev, lanes.get(lane, 0),
                                    stop - start, entries_body(entries[start:stop])))
            lanes[lane] = messages[-1].last
            start = stop
    return messages, lanes


class Relay:
    def __init__(
        self,
        ledger: LedgerStore,
        database_url: str,
        schema: str,
        js: JetStreamContext,
        streams: Streams,
        *,
        read_interval_s: float = READ_INTERVAL_S,
        read_batch_rows: int = READ_BATCH_ROWS,
    ) -> None:
        assert read_interval_s >= 0 and read_batch_rows >= ENTRIES_PER_MESSAGE_MAX
        self._read_interval_s = read_interval_s
        self._read_batch_rows = read_batch_rows
        self._ledger = ledger
        self._url = database_url
        self._schema = schema
        self._js = js
        self._streams = streams
        self._lock_key = lock_key(schema, RELAY_NAME)
        table = sql.Identifier(schema, ledger.events_table)
        self._select = sql.SQL(
            "SELECT notification_id, topic, {} FROM {}"
            " WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(ENTRY_SQL, table)
        # A page at most one message long, aggregated by Postgres: when all of it is of one
        # topic and fits (the usual page under load), it is that message's body as is.
        self._select_page = sql.SQL(
            "SELECT count(*)::int4, min(topic), max(topic), min(notification_id),"
            " max(notification_id), coalesce(sum(length(entry)), 0)::int8,"
            " string_agg(entry, ''::bytea ORDER BY notification_id) FROM ("
            " SELECT notification_id, topic, {} AS entry FROM {} WHERE notification_id > %s"
            " ORDER BY notification_id LIMIT %s) AS page"
        ).format(ENTRY_SQL, table)
        self.is_leader = False
        self.published_entries = 0
        self.published_messages = 0

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT_S,
                    options=f"-c search_path={self._schema} -c synchronous_commit=off",
                ) as conn:
                    row = await (await conn.execute(
                        "SELECT pg_try_advisory_lock(%s)", (self._lock_key,)
                    )).fetchone()
                    if not (row and row[0]):
                        await _wait(stop, STANDBY_POLL_S)
                        continue
                    self.is_leader = True
                    log.info("relay active")
                    await conn.execute(f'LISTEN "{self._ledger.channel}"')
                    attempt = 0
                    await self._pump(conn, stop)
            except (psycopg.Error, OSError) as e:
                log.warning("relay lost Postgres: %s", e)
                await _wait(stop, RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
                attempt += 1
            finally:
                self.is_leader = False

    async def _pump(self, conn: psycopg.AsyncConnection[tuple[object, ...]], stop: asyncio.Event) -> None:
        position, lanes = await asyncio.to_thread(self._read_positions)
        marks = _Marks(lanes)
        failures = 0
        read_at = saved_at = 0.0
        saved = position
        backlog = False
        while not stop.is_set():
            # At most one read per READ_INTERVAL_S while the relay keeps up: under load, fewer
            # and fuller messages (each message costs the relay, JetStream and every projector
            # a few system calls), for a few ms of latency. A full read means a backlog (a
            # restart, NATS back after an outage): the next read goes at once, or catching up
            # would be capped at READ_BATCH_ROWS per interval (200,000 entries/s).
            pause = 0.0 if backlog else read_at + self._read_interval_s - time.monotonic()
            if pause > 0:
                await _wait(stop, pause)  # a stop ends the pause
                if stop.is_set():
                    break
            read_at = time.monotonic()
            messages, next_lanes = await self.read_messages(conn, position, lanes)
            backlog = sum(m.count for m in messages) >= self._read_batch_rows
            if not messages:
                if saved != position:
                    await self._save(conn, position, lanes)
                    saved, saved_at = position, time.monotonic()
                await self._mark(marks, position, lanes, idle=True)
                await self._wait_for_notify(conn, stop)
                continue
            try:
                await self._publish(messages)
            except Exception as e:  # any broker failure: keep the position, retry later
                log.warning("relay cannot publish (will retry): %s: %s", type(e).__name__, e)
                await _wait(stop, RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            position, lanes = messages[-1].last, next_lanes
            if time.monotonic() - saved_at >= POSITION_SAVE_INTERVAL_S:
                await self._save(conn, position, lanes)
                saved, saved_at = position, time.monotonic()
            await self._mark(marks, position, lanes, idle=False)
        if saved != position:  # stopping: the next relay starts where this one ended
            with contextlib.suppress(psycopg.Error, OSError):
                await self._save(conn, position, lanes)

    async def _save(self, conn: psycopg.AsyncConnection[Any], position: int,
                    lanes: dict[str, int]) -> None:
        """Where to resume. Saved every POSITION_SAVE_INTERVAL_S under load (and not waiting for
        the WAL flush): a position lost in a crash only re-publishes messages that JetStream
        (Nats-Msg-Id) and the projectors' tracking drop again."""
        await conn.execute(
            "INSERT INTO relay_positions (name, position) VALUES (%s, %s), (%s, %s), (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
            (RELAY_NAME, position, *(x for lane in LANES
                                     for x in (_lane_row(lane), lanes.get(lane, position)))),
        )

    async def read_messages(
        self, conn: psycopg.AsyncConnection[Any], position: int, lanes: dict[str, int]
    ) -> tuple[list[Message], dict[str, int]]:
        """The next messages after `position` (up to read_batch_rows entries), in order, and the
        lanes' last positions after them. A page of one topic that fits in a message comes
        aggregated by Postgres, costing this process nothing per entry; any other page is read
        entry by entry and grouped here."""
        messages: list[Message] = []
        lanes = dict(lanes)
        cur = conn.cursor(binary=True)
        read = 0
        while read < self._read_batch_rows:
            after = messages[-1].last if messages else position
            await cur.execute(self._select_page, (after, ENTRIES_PER_MESSAGE_MAX), prepare=True)
            row = await cur.fetchone()
            assert row is not None
            count, topic, other, first, last, size, blob = row
            if not count:
                break
            read += count
            if topic == other and size <= MAX_MESSAGE_BYTES:
                lane = lane_of(topic)
                messages.append(Message(topic, first, last, after, lanes.get(lane, 0), count,
                                        entries_header(count) + blob))
                lanes[lane] = last
            else:
                grouped, lanes = group_messages(await self.read_page(conn, after), after, lanes)
                messages += grouped
            if count < ENTRIES_PER_MESSAGE_MAX:
                break
        return messages, lanes

    async def read_page(self, conn: psycopg.AsyncConnection[Any], position: int) -> list[Row]:
        """The next page of the ledger after `position`, in order (the library's notification
        log), each entry already encoded for the wire by Postgres."""
        cur = conn.cursor(binary=True)
        await cur.execute(self._select, (position, ENTRIES_PER_MESSAGE_MAX), prepare=True)
        return await cur.fetchall()

    async def _mark(self, marks: _Marks, position: int, lanes: dict[str, int], idle: bool) -> None:
        """Tell a lane that saw nothing new up to `position` so (a watermark): its projectors
        then reach the ledger head too. Every MARK_INTERVAL_S under load, and when idle. Only
        a hint, outside the chain: a lost watermark delays tracking, never skips an entry."""
        for lane in marks.due(position, lanes, idle, time.monotonic()):
            try:
                await self._js.publish(
                    self._streams.watermark_subject(lane), b"", timeout=PUBLISH_TIMEOUT_S,
                    stream=self._streams.ledger,
                    headers={"Nats-Msg-Id": f"mark-{lane}-{position}", TOPIC_HEADER: WATERMARK,
                             LANE_HEADER: lane, LANE_PREV_HEADER: str(lanes.get(lane, 0)),
                             LAST_HEADER: str(position)},
                )
            except Exception as e:  # a hint; the next one will do
                log.warning("relay cannot publish a watermark: %s: %s", type(e).__name__, e)
                continue
            marks.sent(lane, position, time.monotonic())

    def _read_positions(self) -> tuple[int, dict[str, int]]:
        """The relay's position and each lane's last one. A lane never saved (an older relay)
        counts as the position: projectors then fill from the ledger, never skip."""
        with psycopg.connect(
            self._url, connect_timeout=DB_CONNECT_TIMEOUT_S,
            options=f"-c search_path={self._schema}",
        ) as c:
            position = relay_position(c, RELAY_NAME)
            return position, {lane: relay_position(c, _lane_row(lane)) or position
                              for lane in LANES}

    async def _publish(self, messages: list[Message]) -> None:
        acks = await asyncio.gather(*(
            self._js.publish(
                self._streams.ledger_subject(m.topic),
                m.body,
                timeout=PUBLISH_TIMEOUT_S,
                stream=self._streams.ledger,
                headers={"Nats-Msg-Id": f"{m.first}-{m.last}", PREV_HEADER: str(m.prev),
                         LANE_PREV_HEADER: str(m.lane_prev), TOPIC_HEADER: m.topic,
                         FORMAT_HEADER: ENTRIES_FORMAT},
            )
            for m in messages
        ))
        assert len(acks) == len(messages)
        self.published_messages += len(messages)
        self.published_entries += sum(m.count for m in messages)

    async def _wait_for_notify(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], stop: asyncio.Event
    ) -> None:
        # The poll timeout bounds the stall if a NOTIFY is lost.
        gen = conn.notifies(timeout=POLL_INTERVAL_S, stop_after=1)
        async for _ in gen:
            break
        del stop


class _Marks:
    """Per lane: the position its last watermark (or entry) covered, and when it was sent."""

    def __init__(self, lanes: dict[str, int]) -> None:
        self._covered = {lane: lanes.get(lane, 0) for lane in LANES}
        self._sent_at = dict.fromkeys(LANES, 0.0)

    def due(self, position: int, lanes: dict[str, int], idle: bool, now: float) -> list[str]:
        return [lane for lane in LANES
                if lanes.get(lane, 0) < position and self._covered[lane] < position
                and (idle or now - self._sent_at[lane] >= MARK_INTERVAL_S)]

    def sent(self, lane: str, position: int, now: float) -> None:
        self._covered[lane] = position
        self._sent_at[lane] = now


def _lane_row(lane: str) -> str:
    return f"{RELAY_NAME}:{lane}"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
