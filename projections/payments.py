"""The payments read model: one row per Payment, per PaymentOrder and per gateway delivery
(domain/payment.py), and the queries the API, the recovery job and /metrics read.

- `payments` holds what the Payment aggregate joins together (authorized, captured amount,
  failure, refunds, what was applied to the invoice, the reasons to review it). Its `status`
  is a generated column over those, written as `Payment.status` decides it, so no handler can
  leave it out of step with the columns it is computed from.
- `payment_orders` holds each Razorpay order and the recovery checks made on it; `paid` says a
  payment linked to the order was captured (the recovery job then leaves the order alone).
- `gateway_events` holds each delivery's envelope and outcome; the body stays in the ledger.

Deterministic: a rebuild from position 0 gives the same rows (every value comes from events).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.types.json import Jsonb

from domain.payment import RECOVERY_SCHEDULE, GatewayEvent, Payment, PaymentOrder
from projections.base import ReadModel, all_rows, one_row, require_row

NAME = "payments"
LIST_MAX_ROWS = 1000
ORDERS_TO_CHECK_MAX_ROWS = 1000
PROCESSED_REFUND = "processed"

DDL = (
    """CREATE TABLE IF NOT EXISTS payments (
        id uuid PRIMARY KEY,
        source text NOT NULL,
        invoice_id uuid,
        organisation_id uuid,
        razorpay_order_id text,
        razorpay_payment_id text,
        method text,
        reference text,
        currency text NOT NULL,
        amount bigint NOT NULL,
        authorized boolean NOT NULL DEFAULT false,
        captured_amount bigint,
        failure text,
        refunds jsonb NOT NULL DEFAULT '{}'::jsonb,
        refunded bigint NOT NULL DEFAULT 0,
        settled boolean NOT NULL DEFAULT false,
        applied bigint NOT NULL DEFAULT 0,
        review jsonb NOT NULL DEFAULT '[]'::jsonb,
        status text GENERATED ALWAYS AS (CASE
            WHEN captured_amount IS NOT NULL THEN CASE
                WHEN refunded >= captured_amount AND captured_amount > 0 THEN 'refunded'
                WHEN refunded > 0 THEN 'partially_refunded'
                ELSE 'captured' END
            WHEN authorized THEN 'authorized'
            WHEN failure IS NOT NULL THEN 'failed'
            ELSE 'created' END) STORED,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS payments_by_created ON payments (created_at, id)",
    "CREATE INDEX IF NOT EXISTS payments_by_invoice ON payments (invoice_id, created_at, id)",
    "CREATE INDEX IF NOT EXISTS payments_by_order ON payments (razorpay_order_id)",
    "CREATE INDEX IF NOT EXISTS payments_in_review ON payments (created_at, id)"
    " WHERE review <> '[]'::jsonb",
    """CREATE TABLE IF NOT EXISTS payment_orders (
        id uuid PRIMARY KEY,
        razorpay_order_id text NOT NULL UNIQUE,
        invoice_id uuid NOT NULL,
        organisation_id uuid NOT NULL,
        amount bigint NOT NULL,
        currency text NOT NULL,
        receipt text NOT NULL,
        created_at timestamptz NOT NULL,
        checks integer NOT NULL DEFAULT 0,
        last_checked_at timestamptz,
        paid boolean NOT NULL DEFAULT false,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS payment_orders_by_invoice ON payment_orders (invoice_id)",
    "CREATE INDEX IF NOT EXISTS payment_orders_unpaid ON payment_orders (created_at, id)"
    " WHERE NOT paid",
    """CREATE TABLE IF NOT EXISTS gateway_events (
        id uuid PRIMARY KEY,
        event_id text NOT NULL,
        event_type text NOT NULL,
        source text NOT NULL,
        received_at timestamptz NOT NULL,
        outcome text,
        detail text,
        processed_at timestamptz,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS gateway_events_by_received ON gateway_events (received_at, id)",
)


# ---- payments ---------------------------------------------------------------------------------

def _opened(cur: Cursor[Any], e: Payment.Opened, position: int) -> None:
    cur.execute(
        "INSERT INTO payments (id, source, razorpay_payment_id, method, reference, currency,"
        " amount, created_at, updated_at, version, ledger_position)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.source, e.razorpay_payment_id, e.method, e.reference, e.currency,
         e.amount, e.timestamp, e.timestamp, e.originator_version, position),
    )


def _update(cur: Cursor[Any], e: Any, position: int, assignments: str,
            values: tuple[Any, ...]) -> None:
    cur.execute(
        f"UPDATE payments SET {assignments}, updated_at = %s, version = %s, ledger_position = %s"
        " WHERE id = %s",
        (*values, e.timestamp, e.originator_version, position, e.originator_id),
    )
    require_row(cur, "payment", e.originator_id)


def _mark_order_paid(cur: Cursor[Any], payment_id: UUID) -> None:
    # Both a capture and a link can be the second of the two facts (linked to an order, and
    # captured) that make the order paid, whichever came first.
    cur.execute(
        "UPDATE payment_orders o SET paid = true FROM payments p WHERE p.id = %s"
        " AND p.captured_amount IS NOT NULL AND o.razorpay_order_id = p.razorpay_order_id"
        " AND NOT o.paid",
        (payment_id,),
    )


def _described(cur: Cursor[Any], e: Payment.Described, position: int) -> None:
    _update(cur, e, position, "amount = %s, currency = %s, method = %s",
            (e.amount, e.currency, e.method))


def _linked(cur: Cursor[Any], e: Payment.Linked, position: int) -> None:
    _update(cur, e, position, "invoice_id = %s, organisation_id = %s, razorpay_order_id = %s",
            (e.invoice_id, e.organisation_id, e.razorpay_order_id))
    _mark_order_paid(cur, e.originator_id)


def _authorized(cur: Cursor[Any], e: Payment.Authorized, position: int) -> None:
    _update(cur, e, position, "authorized = true", ())


def _captured(cur: Cursor[Any], e: Payment.Captured, position: int) -> None:
    _update(cur, e, position, "captured_amount = %s", (e.amount,))
    _mark_order_paid(cur, e.originator_id)


def _failed(cur: Cursor[Any], e: Payment.Failed, position: int) -> None:
    _update(cur, e, position, "failure = %s", (e.reason,))


def _settled(cur: Cursor[Any], e: Payment.Settled, position: int) -> None:
    _update(cur, e, position, "settled = true, applied = %s", (e.applied,))


def _refund_observed(cur: Cursor[Any], e: Payment.RefundObserved, position: int) -> None:
    # A refund moves pending -> processed under one id: the entry is replaced, and `refunded`
    # is summed again over the entries, so a processed refund counts once however it got there.
    entry = Jsonb({e.refund_id: [e.amount, e.status]})
    _update(cur, e, position,
            "refunds = refunds || %s, refunded = (SELECT COALESCE(sum((r.value ->> 0)::bigint), 0)"
            " FROM jsonb_each(payments.refunds || %s) AS r WHERE r.value ->> 1 = %s)",
            (entry, entry, PROCESSED_REFUND))


def _flagged(cur: Cursor[Any], e: Payment.FlaggedForReview, position: int) -> None:
    _update(cur, e, position, "review = review || %s", (Jsonb([e.reason]),))


# ---- orders and deliveries ---------------------------------------------------------------------

def _order_created(cur: Cursor[Any], e: PaymentOrder.Created, position: int) -> None:
    cur.execute(
        "INSERT INTO payment_orders (id, razorpay_order_id, invoice_id, organisation_id, amount,"
        " currency, receipt, created_at, paid, version, ledger_position)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
        " EXISTS (SELECT 1 FROM payments WHERE razorpay_order_id = %s"
        " AND captured_amount IS NOT NULL), %s, %s)",
        (e.originator_id, e.razorpay_order_id, e.invoice_id, e.organisation_id, e.amount,
         e.currency, e.receipt, e.timestamp, e.razorpay_order_id, e.originator_version, position),
    )


def _order_checked(cur: Cursor[Any], e: PaymentOrder.Checked, position: int) -> None:
    cur.execute(
        "UPDATE payment_orders SET checks = checks + 1, last_checked_at = %s, version = %s,"
        " ledger_position = %s WHERE id = %s",
        (e.timestamp, e.originator_version, position, e.originator_id),
    )
    require_row(cur, "payment order", e.originator_id)


def _received(cur: Cursor[Any], e: GatewayEvent.Received, position: int) -> None:
    cur.execute(
        "INSERT INTO gateway_events (id, event_id, event_type, source, received_at,"
        " ledger_position) VALUES (%s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.event_id, e.event_type, e.source, e.timestamp, position),
    )


def _processed(cur: Cursor[Any], e: GatewayEvent.Processed, position: int) -> None:
    cur.execute(
        "UPDATE gateway_events SET outcome = %s, detail = %s, processed_at = %s,"
        " ledger_position = %s WHERE id = %s",
        (e.outcome, e.detail, e.timestamp, position, e.originator_id),
    )
    require_row(cur, "gateway event", e.originator_id)


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("payments", "payment_orders", "gateway_events"),
    handlers={
        Payment.Opened: _opened,
        Payment.Described: _described,
        Payment.Linked: _linked,
        Payment.Authorized: _authorized,
        Payment.Captured: _captured,
        Payment.Failed: _failed,
        Payment.Settled: _settled,
        Payment.RefundObserved: _refund_observed,
        Payment.FlaggedForReview: _flagged,
        PaymentOrder.Created: _order_created,
        PaymentOrder.Checked: _order_checked,
        GatewayEvent.Received: _received,
        GatewayEvent.Processed: _processed,
    },
)


# ---- rows ---------------------------------------------------------------------------------------

class PaymentRow(msgspec.Struct, frozen=True):
    """One payment as the read model holds it. Amounts are paise."""

    id: UUID
    source: str  # razorpay | manual
    invoice_id: UUID | None  # None: matches no order of ours (then it is in review)
    organisation_id: UUID | None
    razorpay_order_id: str | None
    razorpay_payment_id: str | None
    method: str | None
    reference: str | None  # a manual payment's bank or cheque reference
    currency: str
    amount: int  # as first seen
    status: str  # domain.payment.PaymentStatus
    authorized: bool
    captured_amount: int | None
    failure: str | None
    refunds: dict[str, tuple[int, str]]  # refund id -> (paise, pending | failed | processed)
    refunded: int  # processed refunds
    settled: bool  # applied to its invoice (`applied` may be 0: nothing was owed)
    applied: int  # paise that reduced the invoice's amount due
    review: tuple[str, ...]  # why a person must look at it; empty: nothing to review
    created_at: datetime
    updated_at: datetime
    ledger_position: int


class PaymentOrderRow(msgspec.Struct, frozen=True):
    """One Razorpay order for an invoice's amount due (paise), and its recovery checks."""

    id: UUID
    razorpay_order_id: str
    invoice_id: UUID
    organisation_id: UUID
    amount: int
    currency: str
    receipt: str
    created_at: datetime
    checks: int
    last_checked_at: datetime | None
    paid: bool  # a payment linked to it was captured
    ledger_position: int


class GatewayEventRow(msgspec.Struct, frozen=True):
    """One delivery (webhook or recovery) as received; `outcome` None until processed:
    applied | ignored | unreadable | failed."""

    id: UUID
    event_id: str
    event_type: str
    source: str  # webhook | recovery
    received_at: datetime
    outcome: str | None
    detail: str | None
    processed_at: datetime | None
    ledger_position: int


_PAYMENT_COLUMNS = ", ".join(PaymentRow.__struct_fields__)
_ORDER_COLUMNS = ", ".join(f"o.{name}" for name in PaymentOrderRow.__struct_fields__)
_EVENT_COLUMNS = ", ".join(GatewayEventRow.__struct_fields__)


# ---- queries ------------------------------------------------------------------------------------

def get(conn: Connection[Any], ident: UUID) -> PaymentRow | None:
    """One payment, or None."""
    return one_row(conn, PaymentRow, f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = %s",
                   (ident,))


def page(
    conn: Connection[Any],
    limit: int,
    after_cursor: tuple[datetime, UUID] | None,
    *,
    invoice_id: UUID | None = None,
    status: str | None = None,
    organisation_id: UUID | None = None,
    review: bool | None = None,
) -> list[PaymentRow]:
    """Payments oldest first (created_at, id), `limit` at most, after the cursor; each filter
    given narrows the list (`review` True: only those to review; False: only the others)."""
    assert 0 < limit <= LIST_MAX_ROWS + 1  # one more than a page: is there a next one?
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if after_cursor is not None:
        where.append("(created_at, id) > (%(at)s, %(id)s)")
        params |= {"at": after_cursor[0], "id": after_cursor[1]}
    for column, value in (("invoice_id", invoice_id), ("status", status),
                          ("organisation_id", organisation_id)):
        if value is not None:
            where.append(f"{column} = %({column})s")
            params[column] = value
    if review is not None:
        where.append("review <> '[]'::jsonb" if review else "review = '[]'::jsonb")
    query = (f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {' AND '.join(where)}"
             " ORDER BY created_at, id LIMIT %(limit)s")
    return all_rows(conn, PaymentRow, query.encode(), params)


def review_count(conn: Connection[Any]) -> int:
    """How many payments wait for a person (a non-empty review)."""
    row = conn.execute("SELECT count(*) FROM payments WHERE review <> '[]'::jsonb").fetchone()
    return int(row[0]) if row else 0


def failed_deliveries(conn: Connection[Any]) -> int:
    """Gateway deliveries the process manager could not apply (outcome `failed`)."""
    row = conn.execute("SELECT count(*) FROM gateway_events WHERE outcome = 'failed'").fetchone()
    return int(row[0]) if row else 0


def order(conn: Connection[Any], ident: UUID) -> PaymentOrderRow | None:
    """One payment order (our id, domain.payment.order_ref), or None."""
    return one_row(conn, PaymentOrderRow,
                   f"SELECT {_ORDER_COLUMNS} FROM payment_orders o WHERE o.id = %s", (ident,))


def orders_to_check(conn: Connection[Any], now: datetime, limit: int) -> list[PaymentOrderRow]:
    """Orders the recovery job should ask Razorpay about at `now`, the longest overdue first:
    not paid, and their next check due by domain.payment.RECOVERY_SCHEDULE (check n at
    created_at + RECOVERY_SCHEDULE[n]; none after the last). Whatever their invoice's status: a
    payment captured on the order of a void or already paid invoice, its webhook lost, must
    still be found and flagged for review. The service checks due-ness again in the ledger."""
    assert 0 < limit <= ORDERS_TO_CHECK_MAX_ROWS
    due = "o.created_at + (%(schedule)s::interval[])[o.checks + 1]"  # SQL arrays are 1-based
    query = (
        f"SELECT {_ORDER_COLUMNS} FROM payment_orders o"
        " WHERE NOT o.paid"
        # Implied by the schedule (every step is at least its first); says it to the index.
        " AND o.created_at <= %(first_due)s"
        f" AND o.checks < %(checks_max)s AND {due} <= %(now)s"
        f" ORDER BY {due}, o.id LIMIT %(limit)s"
    )
    params = {"schedule": list(RECOVERY_SCHEDULE),
              "first_due": now - RECOVERY_SCHEDULE[0], "checks_max": len(RECOVERY_SCHEDULE),
              "now": now, "limit": limit}
    return all_rows(conn, PaymentOrderRow, query.encode(), params)


def gateway_event(conn: Connection[Any], ident: UUID) -> GatewayEventRow | None:
    """One delivery (our id, domain.payment.gateway_event_ref), or None."""
    return one_row(conn, GatewayEventRow,
                   f"SELECT {_EVENT_COLUMNS} FROM gateway_events WHERE id = %s", (ident,))
