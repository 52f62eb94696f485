"""Per-process caches of small read models, so the ingestion hot path asks Postgres nothing.

Each follows its projection by ledger position (rows changed after the last one seen), twice a
second, so a revoked key stops working on every replica within about a second — a change feed,
not a TTL guess. A miss asks Postgres once (a key created a moment ago works at once); unknown
prefixes are remembered briefly so that garbage keys cannot turn into a query per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from psycopg import Connection
from psycopg_pool import ConnectionPool

from domain.ports import KeyRecord, TokenRecord
from domain.usage import MeterRule
from projections import access, catalogue

log = logging.getLogger("billing.cache")

REFRESH_INTERVAL_S = 0.5
NEGATIVE_TTL_S = 1.0
NEGATIVE_MAX_ENTRIES = 10_000


def _key(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        key_id=row["id"], prefix=row["prefix"], secret_sha256=row["secret_sha256"],
        project_id=row["project_id"], organisation_id=row["organisation_id"],
        timezone=row["timezone"], expires_at=row["expires_at"],
        revoked=row["revoked_at"] is not None, allowed_ips=row["allowed_ips"],
        organisation_allowed_ips=row["organisation_allowed_ips"], suspended=row["suspended"],
        rate_per_s=row["rate_limit_per_s"], rate_burst=row["rate_limit_burst"],
    )


Row = dict[str, Any]
R = TypeVar("R")


class PrefixCache(Generic[R]):
    """Records by visible prefix, loaded on a miss and refreshed from rows changed after the
    newest ledger position seen (`position_column`)."""

    def __init__(self, pool: ConnectionPool, what: str,
                 by_prefix: Callable[[Connection[Any], str], Row | None],
                 changed_since: Callable[[Connection[Any], int], list[Row]],
                 build: Callable[[Row], R], position_column: str) -> None:
        self._pool = pool
        self._what = what
        self._by_prefix_query = by_prefix
        self._changed_since = changed_since
        self._build = build
        self._position_column = position_column
        self._by_prefix: dict[str, R] = {}
        self._unknown: dict[str, float] = {}
        self._watermark = 0

    async def find(self, prefix: str) -> R | None:
        record = self._by_prefix.get(prefix)
        if record is not None:
            return record
        if self._unknown.get(prefix, 0.0) > time.monotonic():
            return None
        return await asyncio.to_thread(self._load_one, prefix)

    def _load_one(self, prefix: str) -> R | None:
        with self._pool.connection() as conn:
            row = self._by_prefix_query(conn, prefix)
        if row is None:
            if len(self._unknown) >= NEGATIVE_MAX_ENTRIES:
                self._unknown.clear()
            self._unknown[prefix] = time.monotonic() + NEGATIVE_TTL_S
            return None
        record = self._build(row)
        self._by_prefix[prefix] = record
        return record

    def refresh(self) -> int:
        with self._pool.connection() as conn:
            rows = self._changed_since(conn, self._watermark)
        for row in rows:
            self._by_prefix[row["prefix"]] = self._build(row)
            self._unknown.pop(row["prefix"], None)
            self._watermark = max(self._watermark, int(row[self._position_column]))
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        await _follow(self.refresh, stop, self._what)


def KeyCache(pool: ConnectionPool) -> PrefixCache[KeyRecord]:
    return PrefixCache(pool, "key cache", catalogue.key_by_prefix, catalogue.keys_changed_since,
                       _key, "position")


def TokenCache(pool: ConnectionPool) -> PrefixCache[TokenRecord]:
    return PrefixCache(pool, "token cache", access.token_by_prefix, access.tokens_changed_since,
                       _token, "ledger_position")


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
            r["code"]: MeterRule(r["code"], r["aggregation"], r["field"], tuple(r["group_by"]),
                                 r["allow_negative"])
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


def _token(row: dict[str, Any]) -> TokenRecord:
    return TokenRecord(
        token_id=row["id"], token_sha256=row["token_sha256"], role=row["role"],
        organisation_id=row["organisation_id"], expires_at=row["expires_at"],
        revoked=row["revoked_at"] is not None,
    )
