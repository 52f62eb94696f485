"""Group commit for usage: concurrent requests are appended to the ledger together.

Requests queue up (bounded in events) on the API's event loop. One writer task takes whatever
is queued (bounded batch) and appends it in ONE round trip: a call of `billing_append_usage`,
a SQL function that, in one transaction, takes the library's own `LOCK TABLE ... IN EXCLUSIVE
MODE` (so positions commit in order, as the library's recorder does), inserts the rows into the
library's events table with `ON CONFLICT DO NOTHING` (a resend is a duplicate, by primary key),
NOTIFYs the relay, and returns the new position and, only when some rows were duplicates, the
ids it did insert. Each request is answered only after its own events committed.

Batching is natural: while one append is in flight, requests queue for the next, so a lone
request is not delayed and a busy service commits many requests per round trip. There is no
thread: the writer is a task on the API's event loop over psycopg's async connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.utils import get_topic
from psycopg import sql

from adapters.codec import encode_state
from domain.errors import Unavailable
from domain.ports import Appended, KeyRecord
from domain.usage import Usage, UsageFact, usage_ids

log = logging.getLogger("billing.ingest")

BATCH_MAX_EVENTS = 20_000
QUEUE_MAX_EVENTS = 100_000
REQUEST_DEADLINE_S = 5.0  # a request not written by then is answered 503
LOCK_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 10
CONNECT_TIMEOUT_S = 2
STOP_TIMEOUT_S = STATEMENT_TIMEOUT_S + CONNECT_TIMEOUT_S
UNHEALTHY_HOLD_S = 1.0  # after a failed commit, refuse at once for this long
RETRY_AFTER_S = 1
USAGE_TOPIC = get_topic(Usage.Recorded)
USAGE_AGGREGATE_TOPIC = get_topic(Usage)
APPEND_FUNCTION = "billing_append_usage"


def append_function_ddl(schema: str, events_table: str, channel: str) -> sql.Composed:
    """The append as one SQL function (created at setup): one round trip per group commit."""
    body = sql.SQL("""
BEGIN
  LOCK TABLE {table} IN EXCLUSIVE MODE;
  WITH ins AS (
    INSERT INTO {table} (originator_id, originator_version, topic, state)
    SELECT r.id, 1, {topic}, r.st FROM unnest(ids, states) AS r(id, st)
    ON CONFLICT DO NOTHING
    RETURNING {table}.originator_id, {table}.notification_id)
  SELECT max(ins.notification_id), count(*),
         CASE WHEN count(*) < cardinality(ids) THEN array_agg(ins.originator_id) END
    INTO head, inserted, inserted_ids FROM ins;
  IF inserted > 0 THEN
    PERFORM pg_notify({channel}, '');
  ELSE
    head := (SELECT max(notification_id) FROM {table});
  END IF;
END""").format(table=sql.Identifier(schema, events_table), topic=sql.Literal(USAGE_TOPIC),
               channel=sql.Literal(channel))
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {name}(ids uuid[], states bytea[], OUT head bigint,"
        " OUT inserted bigint, OUT inserted_ids uuid[]) LANGUAGE plpgsql AS {body}"
    ).format(name=sql.Identifier(schema, APPEND_FUNCTION),
             body=sql.Literal(body.as_string(None)))


@dataclass
class _Request:
    rows: list[tuple[UUID, bytes]]
    future: asyncio.Future[Appended]
    deadline: float


def encode_usage(key: KeyRecord, fact: UsageFact, received_at: datetime) -> tuple[UUID, bytes]:
    return encode_usages(key, [fact], received_at)[0]


def encode_usages(
    key: KeyRecord, facts: Sequence[UsageFact], received_at: datetime
) -> list[tuple[UUID, bytes]]:
    """Ledger rows (identity, encoded Usage.Recorded) for one key's validated usage."""
    ids = usage_ids(key.project_id, [f.event_id for f in facts])
    common = {
        "timestamp": received_at,
        "originator_topic": USAGE_AGGREGATE_TOPIC,
        "organisation_id": key.organisation_id,
        "project_id": key.project_id,
        "timezone": key.timezone,
    }
    return [
        (ident, encode_state(Usage.Recorded, common | {
            "event_id": fact.event_id,
            "metric": fact.metric,
            "value": fact.value,
            "occurred_at": fact.occurred_at,
            "properties": fact.properties,
        }))
        for ident, fact in zip(ids, facts, strict=True)
    ]


class UsageWriter:
    """Implements domain.ports.UsageRecorder. Lives on one event loop: the writer task starts
    with the first append."""

    def __init__(
        self, database_url: str, schema: str,
        *, queue_max_events: int = QUEUE_MAX_EVENTS, batch_max_events: int = BATCH_MAX_EVENTS,
    ) -> None:
        assert 0 < batch_max_events <= queue_max_events
        self._queue_max = queue_max_events
        self._batch_max = batch_max_events
        self._url = database_url
        self._call = sql.SQL("SELECT * FROM {}(%b, %b)").format(
            sql.Identifier(schema, APPEND_FUNCTION))
        self._queue: deque[_Request] = deque()
        self._queued_events = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._unhealthy_until = 0.0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self.appended_events = 0
        self.commits = 0

    async def record(
        self, key: KeyRecord, facts: Sequence[UsageFact], received_at: datetime
    ) -> Appended:
        return await self.append(encode_usages(key, facts, received_at))

    async def append(self, rows: list[tuple[UUID, bytes]]) -> Appended:
        """Queue rows for the next group commit and wait for it. Raises Unavailable at once
        when shutting down, unhealthy or full."""
        if self._stopping:
            raise Unavailable("shutting down", RETRY_AFTER_S)
        if time.monotonic() < self._unhealthy_until:
            raise Unavailable("the ledger cannot commit right now", RETRY_AFTER_S)
        if self._queued_events + len(rows) > self._queue_max:
            raise Unavailable("ingestion is at capacity; retry shortly", RETRY_AFTER_S)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # first use, or it died: (re)start it
            self._task = loop.create_task(self._run(), name="usage-writer")
        future: asyncio.Future[Appended] = loop.create_future()
        self._queue.append(_Request(rows, future, time.monotonic() + REQUEST_DEADLINE_S))
        self._queued_events += len(rows)
        self._wake.set()
        return await future

    async def stop(self) -> None:
        """Finish what is queued (bounded), then close; later appends get 503."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, STOP_TIMEOUT_S)
            self._task = None
        _fail(list(self._queue), Unavailable("shutting down", RETRY_AFTER_S))
        self._queue.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # ---- the writer task -------------------------------------------------------------------

    def _take(self) -> list[_Request]:
        taken: list[_Request] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0].rows) <= self._batch_max):
            request = self._queue.popleft()
            taken.append(request)
            count += len(request.rows)
        self._queued_events -= count
        return taken

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take()
            now = time.monotonic()
            live = []
            for r in batch:
                if r.future.done():  # the client went away (cancelled)
                    continue
                if r.deadline < now:
                    r.future.set_exception(Unavailable("timed out waiting for the ledger", RETRY_AFTER_S))
                else:
                    live.append(r)
            if live:
                await self._write(live)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                options=f"-c lock_timeout={LOCK_TIMEOUT_S}s"
                        f" -c statement_timeout={STATEMENT_TIMEOUT_S}s")
        return self._conn

    async def _write(self, batch: list[_Request]) -> None:
        try:
            results = await self._commit(batch)
        except asyncio.CancelledError:  # stop() gave up waiting: answer, then stop
            _fail(batch, Unavailable("shutting down", RETRY_AFTER_S))
            raise
        except Exception as e:  # whatever it was, every waiting request gets its answer
            if isinstance(e, (psycopg.Error, OSError)):
                log.warning("usage append failed: %s: %s", type(e).__name__, e)
            else:
                log.exception("usage append failed unexpectedly")
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
            self._conn = None
            self._unhealthy_until = time.monotonic() + UNHEALTHY_HOLD_S
            _fail(batch, Unavailable("the ledger cannot commit right now", RETRY_AFTER_S))
            return
        for r, appended in zip(batch, results, strict=True):
            if not r.future.done():
                r.future.set_result(appended)

    async def _commit(self, batch: list[_Request]) -> list[Appended]:
        # Within the batch the first occurrence of an id wins; later ones are duplicates.
        firsts: dict[UUID, bytes] = {}
        for r in batch:
            for ident, state in r.rows:
                firsts.setdefault(ident, state)
        conn = await self._connection()
        cur = await conn.execute(self._call, (list(firsts), list(firsts.values())), prepare=True)
        row = await cur.fetchone()
        assert row is not None
        position, inserted, inserted_ids = int(row[0] or 0), int(row[1]), row[2]
        # The function names the inserted ids only when some were not (duplicates).
        fresh = set(firsts) if inserted == len(firsts) else set(inserted_ids or ())
        results = []
        for r in batch:
            accepted = 0
            for ident, _ in r.rows:
                if ident in fresh:
                    fresh.discard(ident)  # a later copy in the batch is a duplicate
                    accepted += 1
            results.append(Appended(accepted, len(r.rows) - accepted, position))
        self.appended_events += inserted
        self.commits += 1
        return results


def _fail(requests: list[_Request], error: Unavailable) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(error)
