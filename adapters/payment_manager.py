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
deliveries after it; `billing payments reapply` applies it afresh once the bug is fixed. The
ledger or Postgres away (Unavailable, connection errors), or a save race that outlasted the
service's own retries (Conflict), is retried forever without giving up, after a growing but
bounded delay: nothing is recorded as failed for the infrastructure's or a race's sake.
Anything else escaping a pass (e.g. from recording a failure) is logged with its traceback and
the pass is tried again after ERROR_DELAY_S: `run` never ends but by `stop`, because a worker
stops all its projectors when one of its jobs ends.
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
from domain.errors import Conflict, Unavailable
from domain.payment import GatewayEvent
from domain.services.payments import PaymentsService

log = logging.getLogger("billing.payments")

NAME = "payments-manager"
POLL_INTERVAL_S = 0.1  # idle: how soon a recorded delivery is applied
PAGE_ROWS = 200  # deliveries read per query
APPLY_RETRY_BACKOFF_S = (0.05, 0.2, 1.0)  # an unexpected error, before recording it as failed
# Infrastructure away, or a save race: the first retry soon, then doubling up to the cap.
RETRY_FIRST_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 2.0
ERROR_DELAY_S = 5.0  # after an unexpected error escaped a pass: a bug, so no busy loop
ERROR_DETAIL_MAX_CHARS = 2000  # of a failure's "Type: message", as recorded on the delivery
# Worth another pass later, never a reason to record a delivery as failed.
_RETRYABLE = (*TRANSIENT, Unavailable, Conflict)
_TOPIC = get_topic(GatewayEvent.Received)


class PaymentManager:
    """Applies deliveries in ledger order; `run` until `stop`."""

    def __init__(self, ledger: LedgerStore, pool: ConnectionPool, payments: PaymentsService, *,
                 retry_backoff_s: Sequence[float] = APPLY_RETRY_BACKOFF_S,
                 retry_max_delay_s: float = RETRY_MAX_DELAY_S,
                 error_delay_s: float = ERROR_DELAY_S) -> None:
        self._ledger = ledger
        self._pool = pool
        self._payments = payments
        self._backoff = tuple(retry_backoff_s)
        self._retry_max_delay_s = retry_max_delay_s
        self._error_delay_s = error_delay_s
        self.applied = 0
        self.failed = 0
        self.errors = 0  # unexpected errors that escaped a pass (each logged with its traceback)

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`: at once while there is more to read, else after
        POLL_INTERVAL_S. Returns only when `stop` is set: every error is logged and waited out."""
        delay = RETRY_FIRST_DELAY_S
        while not stop.is_set():
            try:
                busy = await self.step()
                delay = RETRY_FIRST_DELAY_S
            except _RETRYABLE as e:
                log.warning("payments manager will retry in %.1f s: %s: %s", delay,
                            type(e).__name__, e)
                await _wait(stop, delay)
                delay = min(delay * 2, self._retry_max_delay_s)
                continue
            except Exception:
                self.errors += 1
                log.exception("payments manager: a pass failed; trying again in %.0f s",
                              self._error_delay_s)
                await _wait(stop, self._error_delay_s)
                continue
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
            except _RETRYABLE:
                raise  # run() retries the pass: never recorded as failed
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:ERROR_DETAIL_MAX_CHARS]
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
