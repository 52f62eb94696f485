"""The payments process manager: applies recorded gateway deliveries (GatewayEvent.Received) to
payments and invoices, in ledger order, by calling the payments service.

Why a process manager: the webhook route records a verified delivery and answers at once
(Razorpay's 5 s budget must hold however slow the rest is); applying it, which reads and saves
several aggregates, happens here. It follows the ledger itself, not the stream: it reads the
head, then the deliveries up to the head (rows at or below the head are committed, as the
ledger's table lock makes positions visible in commit order), and remembers the head in
`projection_tracking` under NAME, so each pass reads only what is new.

Exactly once in effect: applying a delivery saves its `Processed` with what it changed, in one
append (domain/services/payments.py). A crash before tracking is written, or two managers in
two workers, apply nothing twice: the second finds the delivery processed (or loses the race
on its version, and then finds it processed).

A delivery whose applying raises something unexpected is retried with backoff, then recorded as
`failed` with the error (visible in the gateway_events read model) so that it never blocks the
deliveries after it. The ledger or Postgres away (Unavailable, connection errors) is retried
forever without giving up: nothing is recorded as failed for the infrastructure's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from uuid import UUID

from eventsourcing.utils import get_topic
from psycopg_pool import ConnectionPool

from adapters.ledger import LedgerStore
from adapters.pg import TRANSIENT
from domain.errors import Unavailable
from domain.payment import GatewayEvent
from domain.services.payments import PaymentsService

log = logging.getLogger("billing.payments")

NAME = "payments-manager"
POLL_INTERVAL_S = 0.1  # idle: how soon a recorded delivery is applied
PAGE_ROWS = 200  # deliveries read per query
APPLY_RETRY_BACKOFF_S = (0.05, 0.2, 1.0)
INFRA_RETRY_DELAY_S = 1.0
_TOPIC = get_topic(GatewayEvent.Received)


class PaymentManager:
    """Applies deliveries in ledger order; `run` until `stop`."""

    def __init__(self, ledger: LedgerStore, pool: ConnectionPool, payments: PaymentsService,
                 retry_backoff_s: Sequence[float] = APPLY_RETRY_BACKOFF_S) -> None:
        self._ledger = ledger
        self._pool = pool
        self._payments = payments
        self._backoff = tuple(retry_backoff_s)
        self.applied = 0
        self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await self.step()
            except (*TRANSIENT, Unavailable) as e:
                log.warning("payments manager will retry: %s: %s", type(e).__name__, e)
                busy = False
                await _wait(stop, INFRA_RETRY_DELAY_S)
            if not busy:
                await _wait(stop, POLL_INTERVAL_S)

    async def step(self) -> bool:
        """One pass: apply the deliveries after the tracked position, up to the head read now.
        True when there may be more to read at once."""
        tracked = await asyncio.to_thread(self._tracked)
        head = await asyncio.to_thread(self._ledger.head)
        if head <= tracked:
            return False
        page = await asyncio.to_thread(self._ledger.read_after, tracked, PAGE_ROWS, head, [_TOPIC])
        for notification in page:
            await self._apply(UUID(str(notification.originator_id)))
            await asyncio.to_thread(self._track, notification.id)
        full = len(page) == PAGE_ROWS
        if not full:
            await asyncio.to_thread(self._track, head)  # nothing else of ours up to the head
        return full

    async def _apply(self, ref: UUID) -> None:
        error = ""
        for attempt in range(len(self._backoff) + 1):
            try:
                outcome = await asyncio.to_thread(self._payments.apply_delivery, ref)
                self.applied += 1
                log.info("gateway delivery applied", extra={"delivery": {"id": str(ref),
                                                                         "outcome": outcome}})
                return
            except (*TRANSIENT, Unavailable):
                raise
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:2000]
                log.warning("payments manager: delivery %s failed (attempt %d): %s", ref,
                            attempt + 1, error)
                if attempt < len(self._backoff):
                    await asyncio.sleep(self._backoff[attempt])
        await asyncio.to_thread(self._payments.give_up, ref, error)
        self.failed += 1
        log.error("payments manager: delivery %s recorded as failed: %s", ref, error)

    def _tracked(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT position FROM projection_tracking WHERE name = %s",
                               (NAME,)).fetchone()
            return int(row[0]) if row else 0

    def _track(self, position: int) -> None:
        """Forward only: two managers never move the row back."""
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO projection_tracking (name, position) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()"
                " WHERE projection_tracking.position < EXCLUDED.position",
                (NAME, position))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
