"""The relay (outbox): publishes the ledger, in order, to the JetStream LEDGER stream.

One relay is active at a time (a Postgres advisory lock); others wait as hot standbys. It wakes
on the ledger's NOTIFY and also polls, because a lost NOTIFY must not stall it (TECH-NOTES). Its
position is saved only after JetStream acknowledged every message up to it, and each message's
Nats-Msg-Id is its ledger position range, so re-publishing after a crash is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from nats.js import JetStreamContext
from psycopg import sql

from adapters.bookkeeping import lock_key, relay_position
from adapters.bus import (
    LANE_HEADER,
    LANE_PREV_HEADER,
    LANES,
    LAST_HEADER,
    MAX_MESSAGE_BYTES,
    PREV_HEADER,
    TOPIC_HEADER,
    WATERMARK,
    Entry,
    RelayedBatch,
    Streams,
    encode,
    lane_of,
)
from adapters.ledger import LedgerStore

log = logging.getLogger("billing.relay")

READ_BATCH_ROWS = 5000
ENTRIES_PER_MESSAGE_MAX = 1000
POLL_INTERVAL_S = 0.5
READ_INTERVAL_S = 0.01
MARK_INTERVAL_S = 0.05  # under load, a quiet lane hears of the head this often
STANDBY_POLL_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DB_CONNECT_TIMEOUT_S = 5
RELAY_NAME = "relay"


def group_messages(
    entries: Sequence[Entry], prev: int, lane_last: dict[str, int]
) -> tuple[list[RelayedBatch], dict[str, int]]:
    """Consecutive entries of one topic share a message, bounded in count and bytes. Each
    message names `prev` and its lane's prev; returns the lanes' last positions after them."""
    batches: list[RelayedBatch] = []
    lanes = dict(lane_last)
    current: list[Entry] = []
    size = 0

    def close() -> None:
        lane = lane_of(current[0].topic)
        batches.append(RelayedBatch(prev=batches[-1].last if batches else prev, entries=current,
                                    lane_prev=lanes.get(lane, 0)))
        lanes[lane] = current[-1].position

    for entry in entries:
        entry_size = len(entry.state) + len(entry.topic) + 48
        if current and (
            current[0].topic != entry.topic
            or len(current) >= ENTRIES_PER_MESSAGE_MAX
            or size + entry_size > MAX_MESSAGE_BYTES
        ):
            close()
            current, size = [], 0
        current.append(entry)
        size += entry_size
    if current:
        close()
    return batches, lanes


class Relay:
    def __init__(
        self,
        ledger: LedgerStore,
        database_url: str,
        schema: str,
        js: JetStreamContext,
        streams: Streams,
    ) -> None:
        self._ledger = ledger
        self._url = database_url
        self._schema = schema
        self._js = js
        self._streams = streams
        self._lock_key = lock_key(schema, RELAY_NAME)
        self._select = sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {}"
            " WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(sql.Identifier(schema, ledger.events_table))
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
        read_at = 0.0
        while not stop.is_set():
            # At most one read per READ_INTERVAL_S: under load, fewer and fuller messages (each
            # message costs the relay, JetStream and every projector), for a few ms of latency.
            await asyncio.sleep(max(0.0, read_at + READ_INTERVAL_S - time.monotonic()))
            read_at = time.monotonic()
            entries = await self._read(conn, position)
            if not entries:
                await self._mark(marks, position, lanes, idle=True)
                await self._wait_for_notify(conn, stop)
                continue
            batches, next_lanes = group_messages(entries, position, lanes)
            try:
                await self._publish(batches)
            except Exception as e:  # any broker failure: keep the position, retry later
                log.warning("relay cannot publish (will retry): %s: %s", type(e).__name__, e)
                await _wait(stop, RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            position, lanes = entries[-1].position, next_lanes
            # Not waiting for the WAL flush: a position lost in a crash only re-publishes
            # messages that JetStream (Nats-Msg-Id) and the projectors' tracking drop again.
            await conn.execute(
                "INSERT INTO relay_positions (name, position) VALUES (%s, %s), (%s, %s), (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
                (RELAY_NAME, position, *(x for lane in LANES
                                         for x in (_lane_row(lane), lanes.get(lane, position)))),
            )
            await self._mark(marks, position, lanes, idle=False)

    async def _read(self, conn: psycopg.AsyncConnection[Any], position: int) -> list[Entry]:
        """The next page of the ledger after `position`, in order: the library's own query
        (its notification log), read as binary tuples straight into relay entries."""
        cur = conn.cursor(binary=True)
        await cur.execute(self._select, (position, READ_BATCH_ROWS), prepare=True)
        return [Entry(*row) for row in await cur.fetchall()]

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

    async def _publish(self, batches: list[RelayedBatch]) -> None:
        acks = await asyncio.gather(*(
            self._js.publish(
                self._streams.ledger_subject(b.entries[0].topic),
                encode(b),
                timeout=PUBLISH_TIMEOUT_S,
                stream=self._streams.ledger,
                headers={"Nats-Msg-Id": f"{b.first}-{b.last}", PREV_HEADER: str(b.prev),
                         LANE_PREV_HEADER: str(b.lane_prev), TOPIC_HEADER: b.entries[0].topic},
            )
            for b in batches
        ))
        assert len(acks) == len(batches)
        self.published_messages += len(batches)
        self.published_entries += sum(len(b.entries) for b in batches)

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
