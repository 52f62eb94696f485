"""The ledger: the eventsourcing library's Postgres application recorder with our msgspec mapper.

`LedgerStore` implements domain.ports.Ledger (get/save) and gives the relay and projectors an
ordered reader over the notification log (the ledger's total order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse
from uuid import UUID, uuid4

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    IntegrityError,
    Notification,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.persistence import (
    OperationalError as LibOperationalError,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import Environment
from psycopg import sql
from psycopg.rows import tuple_row

from adapters.codec import MsgspecMapper
from domain.audit import (
    CURRENT_IDEMPOTENCY,
    Actor,
    AlreadyRecorded,
    AuditEntry,
    Recorded,
    describe,
)
from domain.errors import Conflict, NotFound, Unavailable

LEDGER_NAME = "billing"  # the events table is "billing_events"; its NOTIFY channel too
LEDGER_POOL_SIZE = 8
LEDGER_POOL_OVERFLOW = 8
LEDGER_LOCK_TIMEOUT_S = 5  # an append waits this long for the table lock, then fails
LEDGER_CONNECT_TIMEOUT_S = 5
READ_PAGE_MAX_ROWS = 10_000
GET_MANY_MAX_AGGREGATES = 5_000  # aggregates read in one query by get_many

A = TypeVar("A", bound=Aggregate)


def postgres_env(database_url: str, schema: str) -> dict[str, str]:
    """Translate a postgresql:// URL into the library's settings, passed explicitly."""
    url = urlparse(database_url)
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError("DATABASE_URL must start with postgresql://")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": (url.path or "/postgres").lstrip("/") or "postgres",
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(LEDGER_POOL_SIZE),
        "POSTGRES_MAX_OVERFLOW": str(LEDGER_POOL_OVERFLOW),
        "POSTGRES_LOCK_TIMEOUT": str(LEDGER_LOCK_TIMEOUT_S),
        "POSTGRES_CONNECT_TIMEOUT": str(LEDGER_CONNECT_TIMEOUT_S),
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "30",
        "POSTGRES_PRE_PING": "y",
        # With db functions on, inserts skip the table lock (docs/ARCHITECTURE.md, What the
        # libraries do). Keep it off.
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
        "CREATE_TABLE": "y",
    }


class _LedgerApp(Application[UUID]):
    name = LEDGER_NAME

    def construct_env(self, name: str, env: Mapping[str, str] | None = None) -> Environment:
        # Settings come from infra only; never from os.environ behind our back.
        return Environment(name, dict(env or {}))

    def construct_mapper(self) -> MsgspecMapper:
        return MsgspecMapper()


class LedgerStore:
    """Append and read the ledger. Library errors become our domain errors here."""

    def __init__(self, database_url: str, schema: str) -> None:
        self._app = _LedgerApp(env=postgres_env(database_url, schema))
        recorder = self._app.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)
        self.recorder = recorder
        self.mapper: MsgspecMapper = self._app.mapper  # type: ignore[assignment]
        self.channel = recorder.channel_name
        self.events_table = recorder.events_table_name
        self.table = f'"{schema}"."{recorder.events_table_name}"'
        self.appended_events = 0
        self._schema = schema

    def close(self) -> None:
        self._app.close()

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        try:
            aggregate: Aggregate = self._app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise NotFound(kind.__name__, aggregate_id) from None
        except (LibOperationalError, psycopg.OperationalError) as e:
            raise Unavailable(f"ledger unavailable: {type(e).__name__}") from e
        if not isinstance(aggregate, kind):
            raise NotFound(kind.__name__, aggregate_id)
        return aggregate

    def save(self, *aggregates: Aggregate, actor: Actor | None) -> int:
        """Append atomically, with `actor`'s audit entry when there is an actor."""
        idempotent = CURRENT_IDEMPOTENCY.get() if actor is not None else None
        entry: AuditEntry | None = None
        if actor is not None:
            # Under an Idempotency-Key the entry id is derived (domain/audit.py): a second
            # execution of the same command collides here and saves nothing.
            entry_id = idempotent.entry_id() if idempotent is not None else uuid4()
            entry = describe(actor, aggregates, entry_id, datetime.now(UTC))
            if entry is not None:
                aggregates = (*aggregates, entry)
        try:
            recordings = self._app.save(*aggregates)
        except IntegrityError as e:
            if idempotent is not None and entry is not None:
                earlier = self.recorded(entry.id)
                if earlier is not None:
                    idempotent.recorded = earlier
                    raise AlreadyRecorded(earlier) from e
            raise Conflict("already recorded in the ledger") from e
        except (PersistenceError, psycopg.Error) as e:
            raise Unavailable(f"ledger cannot commit: {type(e).__name__}") from e
        if idempotent is not None and entry is not None:
            idempotent.saved()
        if not recordings:
            return self.head()
        self.appended_events += len(recordings)
        return int(recordings[-1].notification.id)

    def get_many(self, aggregate_ids: Iterable[UUID], kind: type[A]) -> dict[UUID, A]:
        """The aggregates of `aggregate_ids` that exist and are a `kind`, read in one query
        (at most GET_MANY_MAX_AGGREGATES ids): what `get` does for each, without a round trip
        each. Ids that are unknown (or of another kind) are absent from the answer."""
        ids = list(dict.fromkeys(aggregate_ids))
        assert len(ids) <= GET_MANY_MAX_AGGREGATES
        if not ids:
            return {}
        statement = (f"SELECT originator_id, originator_version, topic, state FROM {self.table}"
                     " WHERE originator_id = ANY(%b::uuid[]) ORDER BY originator_id, originator_version")
        try:
            with self.recorder.datastore.get_connection() as conn, \
                    conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(statement.encode(), (ids,))
                rows = cur.fetchall()
        except (PersistenceError, psycopg.Error) as e:
            raise Unavailable(f"ledger unavailable: {type(e).__name__}") from e
        built: dict[UUID, Any] = {}
        for row in rows:
            stored = StoredEvent(originator_id=row[0], originator_version=row[1],
                                 topic=row[2], state=bytes(row[3]))
            ident = stored.originator_id
            assert isinstance(ident, UUID)
            built[ident] = self.mapper.to_domain_event(stored).mutate(built.get(ident))
        return {ident: aggregate for ident, aggregate in built.items()
                if isinstance(aggregate, kind)}

    def save_batch(self, groups: Sequence[Sequence[Aggregate]], *, actor: Actor | None) -> int:
        """Append every group's pending events in one transaction (all or nothing), each group
        with its own audit entry when there is an actor, as if each were `save`d alone: many
        invoices per ledger transaction, each still its own aggregate with its own events and
        its own audit entry. Raises Conflict when any id or version already exists."""
        aggregates: list[Aggregate] = []
        now = datetime.now(UTC)
        for group in groups:
            aggregates += group
            if actor is not None:
                entry = describe(actor, group, uuid4(), now)
                if entry is not None:
                    aggregates.append(entry)
        # Pending events are drained only once committed: after a Conflict the aggregates
        # still hold them, so a caller can save them one by one.
        stored = [self.mapper.to_stored_event(e) for a in aggregates for e in a.pending_events]
        if not stored:
            return self.head()
        try:
            position = self._insert(stored)
        # The library's connection turns psycopg's errors into its own (as in `save`).
        except (IntegrityError, psycopg.IntegrityError) as e:
            raise Conflict("already recorded in the ledger") from e
        except (PersistenceError, psycopg.Error) as e:
            raise Unavailable(f"ledger cannot commit: {type(e).__name__}") from e
        for aggregate in aggregates:
            aggregate.collect_events()
        self.appended_events += len(stored)
        return position

    def _insert(self, stored: Sequence[StoredEvent]) -> int:
        """Insert `stored` as the library's recorder does (its table lock, so that positions
        follow commit order, and its NOTIFY), in one statement whose columns go as binary
        arrays: the library's composite-typed rows cost more to encode than the events
        themselves. Returns the position of the last one."""
        with self.recorder.datastore.get_connection() as conn, conn.transaction(), \
                conn.cursor(row_factory=tuple_row) as cur:
            for statement in self.recorder.lock_table_statements:
                cur.execute(statement, prepare=True)
            cur.execute(sql.SQL("NOTIFY {}").format(sql.Identifier(self.channel)))
            cur.execute(sql.SQL(
                "WITH ins AS (INSERT INTO {} (originator_id, originator_version, topic, state)"
                " SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
                " RETURNING notification_id) SELECT max(notification_id) FROM ins"
            ).format(sql.Identifier(self._schema, self.events_table)),
                ([e.originator_id for e in stored], [e.originator_version for e in stored],
                 [e.topic for e in stored], [e.state for e in stored]))
            row = cur.fetchone()
        assert row is not None
        return int(row[0])

    def recorded(self, entry_id: UUID) -> Recorded | None:
        """The audit entry `entry_id` as committed (None when there is none)."""
        try:
            entry = self.get(entry_id, AuditEntry)
        except NotFound:
            return None
        return Recorded(entry.id, list(entry.targets))

    def head(self) -> int:
        """The position of the newest ledger entry (0 when empty)."""
        try:
            return int(self.recorder.max_notification_id() or 0)
        except (PersistenceError, psycopg.Error) as e:
            raise Unavailable(f"ledger unavailable: {type(e).__name__}") from e

    def read_after(
        self, position: int, limit: int, stop: int | None = None, topics: Sequence[str] = ()
    ) -> Sequence[Notification]:
        """Entries with position > `position` (and <= `stop`), in ledger order; only those of
        `topics` when given (filtered by Postgres, not sent and decoded to be skipped)."""
        assert 0 < limit <= READ_PAGE_MAX_ROWS
        notifications: Sequence[Notification] = self.recorder.select_notifications(
            start=position, limit=limit, stop=stop, topics=topics, inclusive_of_start=False
        )
        return notifications

    def decode(self, stored: StoredEvent) -> Any:
        return self.mapper.to_domain_event(stored)
