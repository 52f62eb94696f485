"""Per-process caches of small read models, so the ingestion hot path asks Postgres nothing.

The key and token caches follow their read models' tracking positions, twice a second, so a
revoked key stops working on every API process within about a second of its read model
committing it: a change feed, not a TTL guess. A miss asks Postgres once (a key created a moment
ago works at once); unknown prefixes are remembered briefly so that garbage keys cannot turn into
a query per request. Why tracking positions and not the rows' own: docs/ACCESS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from psycopg import Connection
from psycopg_pool import ConnectionPool

from domain.records import KeyRecord, TokenRecord
from domain.usage import MeterRule
from projections import access, catalogue, organisations

log = logging.getLogger("billing.cache")

REFRESH_INTERVAL_S = 0.5
NEGATIVE_TTL_S = 1.0
NEGATIVE_MAX_ENTRIES = 10_000


def _key(row: catalogue.KeyAccessRow) -> KeyRecord:
    return KeyRecord(
        key_id=row.id, prefix=row.prefix, secret_sha256=row.secret_sha256,
        project_id=row.project_id, organisation_id=row.organisation_id,
        timezone=row.timezone, expires_at=row.expires_at,
        revoked=row.revoked_at is not None, allowed_ips=row.allowed_ips,
        organisation_allowed_ips=row.organisation_allowed_ips, suspended=row.suspended,
        rate_per_s=row.rate_limit_per_s, rate_burst=row.rate_limit_burst,
    )


def _token(row: access.TokenAccessRow) -> TokenRecord:
    return TokenRecord(
        token_id=row.id, token_sha256=row.token_sha256, role=row.role,
        organisation_id=row.organisation_id, expires_at=row.expires_at,
        revoked=row.revoked_at is not None,
        organisation_allowed_ips=row.organisation_allowed_ips,
    )


class Row(Protocol):
    """A read-model row a PrefixCache builds its records from: found by its visible prefix."""

    @property
    def prefix(self) -> str: ...


W = TypeVar("W", bound=Row)  # the read model's row
R = TypeVar("R")  # the cached record
Positions = tuple[int, ...]


@dataclass(frozen=True)
class Source(Generic[W, R]):
    """Where a PrefixCache's records come from. `models` are the read models the records are
    made of; `changed_since` takes one position per model, in that order, and returns every row
    that any of them changed after its position."""

    what: str
    models: tuple[str, ...]
    by_prefix: Callable[[Connection[Any], str], W | None]
    changed_since: Callable[[Connection[Any], Positions], list[W]]
    build: Callable[[W], R]


KEYS: Source[catalogue.KeyAccessRow, KeyRecord] = Source(
    "key cache", (catalogue.READ_MODEL.name, organisations.NAME), catalogue.key_by_prefix,
    lambda conn, since: catalogue.keys_changed_since(conn, since[0], since[1]), _key)
TOKENS: Source[access.TokenAccessRow, TokenRecord] = Source(
    "token cache", (access.NAME, organisations.NAME), access.token_by_prefix,
    lambda conn, since: access.tokens_changed_since(conn, since[0], since[1]), _token)

# One round trip: per followed read model, its tracking position, and how many of its dead
# letters lie at or below the position this cache has followed it to (`w`), and in all.
_FOLLOWED = (
    "SELECT coalesce(t.position, 0), coalesce(t.generation, 0),"
    " (SELECT count(*) FROM projection_dead_letters d WHERE d.name = m.name AND d.position <= m.w),"
    " (SELECT count(*) FROM projection_dead_letters d WHERE d.name = m.name)"
    " FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS m(name, w, i)"
    " LEFT JOIN projection_tracking t ON t.name = m.name ORDER BY m.i"
)
_TRACKING = (
    "SELECT coalesce(t.position, 0) FROM unnest(%s::text[]) WITH ORDINALITY AS m(name, i)"
    " LEFT JOIN projection_tracking t ON t.name = m.name ORDER BY m.i"
)


class PrefixCache(Generic[R]):
    """Records by visible prefix, loaded on a miss and refreshed from the rows changed after the
    tracking positions of its read models seen at the last refresh.

    Every read (a refresh or a miss) is one REPEATABLE READ snapshot that reads the models'
    tracking positions and the rows together, so "everything up to these positions, nothing
    after" is exactly what it saw (a projector commits its rows and its tracking together, in
    ledger order). Each record keeps the positions it was read at; a record read earlier never
    replaces one read later (a miss that overlaps a refresh), under `_lock`.

    Two things move a read model's rows without moving its tracking forward: a dead letter
    applied afterwards (redrive, rebuild) and tracking going back (a Postgres crash losing
    commits made without waiting for the WAL flush, or an operator). Either makes the next
    refresh start over: it reloads every row, in a new epoch that outranks every earlier read."""

    def __init__(self, pool: ConnectionPool, source: Source[Any, R]) -> None:
        self._pool = pool
        self._source = source
        self._by_prefix: dict[str, R] = {}
        self._read_at: dict[str, tuple[int, Positions]] = {}  # prefix -> (epoch, positions)
        self._unknown: dict[str, float] = {}
        self._lock = threading.Lock()  # the compare-and-set of records, and the epoch
        self._refreshing = threading.Lock()  # one refresh at a time: watermarks move in order
        self._epoch = 0
        self._watermarks: Positions = (0,) * len(source.models)
        self._dead_letters: Positions = (0,) * len(source.models)
        self._generations: Positions | None = None  # rebuilds and re-drives seen, per model
        self.lookups = 0  # queries by prefix: what a miss, or a refused attempt, costs

    async def find(self, prefix: str) -> R | None:
        record = self._by_prefix.get(prefix)
        if record is not None:
            return record
        if self._unknown.get(prefix, 0.0) > time.monotonic():
            return None
        return await asyncio.to_thread(self._load_one, prefix)

    async def confirm_refusal(self, prefix: str, attempt: str) -> None:
        """A wrong secret for a known prefix costs what an unknown prefix costs (one lookup, then
        remembered for NEGATIVE_TTL_S), so the time to a refusal does not tell whether a prefix
        exists. `attempt` identifies the secret tried (a digest, never the secret)."""
        key = f"{prefix}\x00{attempt}"
        if self._unknown.get(key, 0.0) > time.monotonic():
            return
        await asyncio.to_thread(self._load_one, prefix)
        with self._lock:
            if len(self._unknown) >= NEGATIVE_MAX_ENTRIES:
                self._unknown.clear()
            self._unknown[key] = time.monotonic() + NEGATIVE_TTL_S

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Connection[Any]]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    def _load_one(self, prefix: str) -> R | None:
        epoch = self._epoch  # a refresh that starts over after this outranks what we read
        self.lookups += 1
        with self._snapshot() as conn:
            row = conn.execute(_TRACKING, (list(self._source.models),)).fetchall()
            positions = tuple(int(r[0]) for r in row)
            found = self._source.by_prefix(conn, prefix)
        if found is None:
            with self._lock:
                if len(self._unknown) >= NEGATIVE_MAX_ENTRIES:
                    self._unknown.clear()
                self._unknown[prefix] = time.monotonic() + NEGATIVE_TTL_S
                return self._by_prefix.get(prefix)
        record = self._source.build(found)
        with self._lock:
            if epoch == self._epoch:
                self._put(prefix, record, positions)
            return self._by_prefix.get(prefix, record)

    def _put(self, prefix: str, record: R, positions: Positions) -> None:
        """Keep `record` unless the cached one was read at a later snapshot (under _lock)."""
        held = self._read_at.get(prefix)
        if held is not None and held[0] == self._epoch and any(
                new < old for new, old in zip(positions, held[1], strict=True)):
            return
        self._by_prefix[prefix] = record
        self._read_at[prefix] = (self._epoch, positions)
        self._unknown.pop(prefix, None)

    def refresh(self) -> int:
        with self._refreshing:
            models = list(self._source.models)
            with self._snapshot() as conn:
                followed = conn.execute(_FOLLOWED, (models, list(self._watermarks))).fetchall()
                positions = tuple(int(r[0]) for r in followed)
                generations = tuple(int(r[1]) for r in followed)
                kept = tuple(int(r[2]) for r in followed)
                dead_letters = tuple(int(r[3]) for r in followed)
                start_over = any(now < before for now, before in zip(
                    (*positions, *kept), (*self._watermarks, *self._dead_letters), strict=True))
                # A rebuild or re-drive rewrote rows below the positions already followed.
                start_over |= self._generations is not None and generations != self._generations
                since = (0,) * len(models) if start_over else self._watermarks
                rows = (self._source.changed_since(conn, since)
                        if start_over or positions != self._watermarks else [])
            with self._lock:
                if start_over:
                    self._epoch += 1
                    log.warning("%s starts over: tracking went back, or a rebuild or re-drive"
                                " rewrote rows",
                                self._source.what)
                for row in rows:
                    self._put(row.prefix, self._source.build(row), positions)
            self._watermarks, self._dead_letters = positions, dead_letters
            self._generations = generations
            return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        await _follow(self.refresh, stop, self._source.what)


def KeyCache(pool: ConnectionPool) -> PrefixCache[KeyRecord]:
    return PrefixCache(pool, KEYS)


def TokenCache(pool: ConnectionPool) -> PrefixCache[TokenRecord]:
    return PrefixCache(pool, TOKENS)


class MeterCache:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._rules: dict[str, MeterRule] = {}

    async def rules(self, codes: set[str]) -> dict[str, MeterRule]:
        if not codes <= self._rules.keys():
            await asyncio.to_thread(self.refresh)
        return {c: self._rules[c] for c in codes if c in self._rules}

    def refresh(self) -> int:
        with self._pool.connection() as conn:
            rows = catalogue.meters(conn)
        self._rules = {
            r.code: MeterRule(r.code, r.aggregation, r.field, r.group_by, r.allow_negative)
            for r in rows
        }
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        await _follow(self.refresh, stop, "meter cache")


async def _follow(refresh: Any, stop: asyncio.Event, what: str) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(refresh)
        except Exception as e:  # Postgres away: keep serving what we know, try again
            log.warning("%s refresh failed: %s", what, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REFRESH_INTERVAL_S)

