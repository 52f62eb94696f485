"""A rate limit shared by every API process: GCRA (a token bucket in one timestamp) kept in
Postgres, one atomic statement per request. If Postgres cannot answer, the request is let
through (the ledger on the same Postgres then answers 503 anyway) and the miss is counted."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("billing.ratelimit")

POOL_MAX_SIZE = 8
POOL_TIMEOUT_S = 2.0
STATEMENT_TIMEOUT_MS = 1000
CHUNK_DIVISOR = 10  # a process takes at most a tenth of the burst or rate per round trip
RESERVE_TTL_S = 0.5
RESERVED_MAX_KEYS = 100_000
DDL = (
    """CREATE TABLE IF NOT EXISTS rate_limits (
        key text PRIMARY KEY,
        tat timestamptz NOT NULL
    )""",
)

_TAKE = """
INSERT INTO rate_limits AS r (key, tat) VALUES (%(key)s, clock_timestamp() + %(step)s)
ON CONFLICT (key) DO UPDATE SET tat = GREATEST(r.tat, clock_timestamp()) + %(step)s
    WHERE GREATEST(r.tat, clock_timestamp()) + %(step)s - clock_timestamp() <= %(window)s
RETURNING extract(epoch FROM tat - clock_timestamp())
"""
_PEEK = "SELECT extract(epoch FROM tat - clock_timestamp()) FROM rate_limits WHERE key = %s"


class PgRateLimiter:
    """Implements domain.ports.RateLimiter."""

    def __init__(self, database_url: str, schema: str) -> None:
        self._pool = AsyncConnectionPool(
            database_url, min_size=1, max_size=POOL_MAX_SIZE, timeout=POOL_TIMEOUT_S, open=False,
            kwargs={"autocommit": True, "options": f"-c search_path={schema}"
                    f" -c statement_timeout={STATEMENT_TIMEOUT_MS}"},
        )
        self.store_errors = 0
        self.round_trips = 0
        # key -> (tokens in hand, until, tokens the shared bucket had left when they were taken,
        # the limit they were taken under). A share or a refusal holds only under the limit it
        # was decided with: after a change (a tenant's limit lowered) it is dropped, or the
        # tokens taken in chunks under the old, higher limit would be spent under the new one.
        self._reserved: dict[str, tuple[int, float, int, tuple[int, int]]] = {}
        self._refused: dict[str, tuple[float, tuple[int, int]]] = {}  # key -> (until, limit)
        self._refills: dict[str, asyncio.Lock] = {}

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def take(self, key: str, per_second: int, burst: int) -> tuple[bool, int, float]:
        local = self._local(key, (per_second, burst))
        if local is not None:
            return local
        # One refill per key at a time: concurrent requests wait for it instead of each asking
        # Postgres (a herd would take many chunks and spend a round trip each).
        lock = self._refills.get(key)
        if lock is None:
            if len(self._refills) > RESERVED_MAX_KEYS:
                self._refills = {k: v for k, v in self._refills.items() if v.locked()}
            lock = self._refills[key] = asyncio.Lock()
        async with lock:
            local = self._local(key, (per_second, burst))
            if local is not None:
                return local
            return await self._refill(key, per_second, burst)

    def _local(self, key: str, limit: tuple[int, int]) -> tuple[bool, int, float] | None:
        """Answer from this process's share, or from a refusal still in force, if they were
        decided under `limit` (per second, burst)."""
        now = time.monotonic()
        tokens, until, shared, taken_under = self._reserved.get(key, (0, 0.0, 0, limit))
        if tokens > 0 and now < until and taken_under == limit:
            self._reserved[key] = (tokens - 1, until, shared, limit)
            # What the client may still send: the bucket's rest plus the share still in hand.
            return True, shared + tokens - 1, 0.0
        refused_until, refused_under = self._refused.get(key, (0.0, limit))
        if now < refused_until and refused_under == limit:
            # Nothing can free a token before then: other processes only take more.
            return False, 0, refused_until - now
        return None

    async def _refill(self, key: str, per_second: int, burst: int) -> tuple[bool, int, float]:
        # Take a chunk of the shared bucket at once when the limit is high, so a busy key costs
        # one round trip per chunk; unused tokens lapse after RESERVE_TTL_S (never over-admit).
        chunk = max(1, min(burst // CHUNK_DIVISOR, per_second // CHUNK_DIVISOR))
        allowed, remaining, retry_s = await self._take(key, per_second, burst, chunk)
        if not allowed and chunk > 1:
            chunk = 1
            allowed, remaining, retry_s = await self._take(key, per_second, burst, 1)
        if len(self._reserved) > RESERVED_MAX_KEYS or len(self._refused) > RESERVED_MAX_KEYS:
            self._reserved.clear()
            self._refused.clear()
        if allowed:
            self._reserved[key] = (chunk - 1, time.monotonic() + RESERVE_TTL_S, remaining,
                                   (per_second, burst))
            remaining += chunk - 1  # the share just taken is this process's to spend
        else:
            self._refused[key] = (time.monotonic() + retry_s, (per_second, burst))
        return allowed, remaining, retry_s

    async def _take(self, key: str, per_second: int, burst: int,
                    count: int) -> tuple[bool, int, float]:
        step_s = 1.0 / per_second
        window_s = burst * step_s
        params = {"key": key, "step": timedelta(seconds=step_s * count),
                  "window": timedelta(seconds=window_s)}
        self.round_trips += 1
        try:
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_TAKE, params, prepare=True)).fetchone()
                if row is not None:
                    ahead = float(row[0])
                    return True, max(0, math.floor((window_s - ahead) / step_s)), 0.0
                peek = await (await conn.execute(_PEEK, (key,))).fetchone()
        except (psycopg.Error, TimeoutError, OSError) as e:
            self.store_errors += 1
            log.warning("rate limit store unavailable, letting the request through: %s", e)
            return True, 0, 0.0
        ahead = float(peek[0]) if peek else window_s
        return False, 0, max(step_s, ahead + step_s - window_s)
