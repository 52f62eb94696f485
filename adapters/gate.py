"""Read-your-writes: wait (with a deadline) until a read model has applied a ledger position."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from adapters.bookkeeping import all_tracking, tracked_position
from adapters.ledger import LedgerStore
from domain.errors import Unavailable

log = logging.getLogger("billing.gate")

WAIT_POLL_S = 0.005
WAITERS_MAX = 10_000  # reads waiting at once in one API process; more get 503 at once


class PgProjectionGate:
    """Implements domain.ports.ProjectionGate over the tracking table."""

    def __init__(self, pool: ConnectionPool, ledger: LedgerStore) -> None:
        self._pool = pool
        self._ledger = ledger

    def wait_for(self, projection: str, position: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._pool.connection() as conn:
                if tracked_position(conn, projection) >= position:
                    return
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"the {projection} read model has not caught up with ledger position "
                    f"{position} yet", retry_after_s=1,
                )
            time.sleep(WAIT_POLL_S)

    def wait_until_current(self, projection: str, min_position: int, timeout_s: float) -> None:
        """Wait until the model includes everything committed before this call (and min_position)."""
        self.wait_for(projection, max(min_position, self._ledger.head()), timeout_s)


class TrackingWatch:
    """Implements domain.ports.TrackingWaiter for the API: readers wait on the event loop, and
    one poll (one thread, one query for every read model) serves them all, only while someone
    waits. A thread per waiting request would let a few dozen slow waits take the API's worker
    threads from every other tenant's reads."""

    def __init__(self, pool: ConnectionPool, ledger: LedgerStore,
                 poll_s: float = WAIT_POLL_S) -> None:
        self._pool = pool
        self._ledger = ledger
        self._poll_s = poll_s
        self._positions: dict[str, int] = {}
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._poller: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def head(self) -> int:
        return await asyncio.to_thread(self._ledger.head)

    async def wait_for(self, projection: str, position: int, timeout_s: float) -> None:
        if self._positions.get(projection, -1) >= position:
            return
        if len(self._waiters) >= WAITERS_MAX:
            raise Unavailable("too many reads are waiting for read models to catch up",
                              retry_after_s=1)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (projection, position, future)
        self._waiters.append(entry)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"the {projection} read model has not caught up with ledger position "
                f"{position} yet", retry_after_s=1) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def _poll(self) -> None:
        """Read every model's tracking until nobody waits; wake those whose position is in."""
        while self._waiters:
            try:
                self._positions = await asyncio.to_thread(self._read)
            except (psycopg.Error, PoolTimeout) as e:  # waiters time out on their own
                log.warning("tracking poll failed: %s", e)
            for projection, position, future in list(self._waiters):
                if not future.done() and self._positions.get(projection, -1) >= position:
                    future.set_result(None)
            await asyncio.sleep(self._poll_s)

    def _read(self) -> dict[str, int]:
        with self._pool.connection() as conn:
            return all_tracking(conn)
