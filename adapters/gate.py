"""Read-your-writes: wait (with a deadline) until a read model has applied a ledger position."""

from __future__ import annotations

import time

from psycopg_pool import ConnectionPool

from adapters.bookkeeping import tracked_position
from adapters.ledger import LedgerStore
from domain.errors import Unavailable

WAIT_POLL_S = 0.005


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
