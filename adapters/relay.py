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
from collections.abc import Sequence
from uuid import UUID

import psycopg
from eventsourcing.persistence import Notification
from nats.js import JetStreamContext

from adapters.bookkeeping import lock_key, relay_position
from adapters.bus import (
    MAX_MESSAGE_BYTES,
    PREV_HEADER,
    TOPIC_HEADER,
    Entry,
    RelayedBatch,
    Streams,
    encode,
)
from adapters.ledger import LedgerStore

log = logging.getLogger("billing.relay")

READ_BATCH_ROWS = 5000
ENTRIES_PER_MESSAGE_MAX = 1000
POLL_INTERVAL_S = 0.5
STANDBY_POLL_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DB_CONNECT_TIMEOUT_S = 5
RELAY_NAME = "relay"


def group_messages(entries: Sequence[Notification], prev: int) -> list[RelayedBatch]:
    """Consecutive entries of one topic share a message, bounded in count and bytes."""
    batches: list[RelayedBatch] = []
    current: list[Entry] = []
    size = 0
    for n in entries:
        entry = Entry(
            position=n.id,
            originator_id=n.originator_id
            if isinstance(n.originator_id, UUID)
            else UUID(str(n.originator_id)),
            originator_version=n.originator_version,
            topic=n.topic,
            state=n.state,
        )
        entry_size = len(n.state) + len(n.topic) + 48
        if current and (
            current[0].topic != n.topic
            or len(current) >= ENTRIES_PER_MESSAGE_MAX
            or size + entry_size > MAX_MESSAGE_BYTES
        ):
            batches.append(RelayedBatch(prev=prev, entries=current))
            prev = current[-1].position
            current, size = [], 0
        current.append(entry)
        size += entry_size
    if current:
        batches.append(RelayedBatch(prev=prev, entries=current))
    return batches


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
        self.is_leader = False
        self.published_entries = 0
        self.published_messages = 0

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT_S,
                    options=f"-c search_path={self._schema}",
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
        position = await asyncio.to_thread(self._read_position)
        failures = 0
        while not stop.is_set():
            entries = await asyncio.to_thread(self._ledger.read_after, position, READ_BATCH_ROWS)
            if not entries:
                await self._wait_for_notify(conn, stop)
                continue
            try:
                await self._publish(group_messages(entries, prev=position))
            except Exception as e:  # any broker failure: keep the position, retry later
                log.warning("relay cannot publish (will retry): %s: %s", type(e).__name__, e)
                await _wait(stop, RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            position = entries[-1].id
            await conn.execute(
                "INSERT INTO relay_positions (name, position) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
                (RELAY_NAME, position),
            )

    def _read_position(self) -> int:
        with psycopg.connect(
            self._url, connect_timeout=DB_CONNECT_TIMEOUT_S,
            options=f"-c search_path={self._schema}",
        ) as c:
            return relay_position(c, RELAY_NAME)

    async def _publish(self, batches: list[RelayedBatch]) -> None:
        acks = await asyncio.gather(*(
            self._js.publish(
                self._streams.ledger_subject(b.entries[0].topic),
                encode(b),
                timeout=PUBLISH_TIMEOUT_S,
                stream=self._streams.ledger,
                headers={"Nats-Msg-Id": f"{b.first}-{b.last}", PREV_HEADER: str(b.prev),
                         TOPIC_HEADER: b.entries[0].topic},
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


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
