"""The credit notes read model: one row per CreditNote (domain/credit_note.py) with its lines,
taxes, totals, settlement and where each refund share is, and the queries the API and the
notifier read.

`shares` is JSON: per share the payment, the amount and the share's state as
domain.credit_note.share_after makes it (the same transition the aggregate applies), so the
row's `status` and `refunded` are computed by the domain's own rules, never re-stated here.
Deterministic: a rebuild from position 0 gives the same rows.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.types.json import Jsonb

from domain.credit_note import CreditNote, CreditNoteMail, ShareState, note_status, share_after
from projections.base import ReadModel, all_rows, one_row, require_row

NAME = "credit_notes"
LIST_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS credit_notes (
        id uuid PRIMARY KEY,
        invoice_id uuid NOT NULL,
        organisation_id uuid NOT NULL,
        number text NOT NULL UNIQUE,
        invoice_number text NOT NULL,
        invoice_date timestamptz NOT NULL,
        reason text NOT NULL,
        settlement text NOT NULL,
        reference text,
        status text NOT NULL,
        currency text NOT NULL,
        lines jsonb NOT NULL,
        subtotal bigint NOT NULL,
        taxes jsonb NOT NULL,
        total bigint NOT NULL,
        refunded bigint NOT NULL DEFAULT 0,
        shares jsonb NOT NULL,
        country text NOT NULL,
        customer_state_code text,
        customer_gstin text,
        supplier_state_code text NOT NULL,
        issued_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        emailed_at timestamptz,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS credit_notes_by_issued ON credit_notes (issued_at, id)",
    "CREATE INDEX IF NOT EXISTS credit_notes_by_invoice ON credit_notes (invoice_id, issued_at, id)",
    "CREATE INDEX IF NOT EXISTS credit_notes_by_organisation"
    " ON credit_notes (organisation_id, issued_at, id)",
    "CREATE INDEX IF NOT EXISTS credit_notes_not_emailed ON credit_notes (issued_at, id)"
    " WHERE emailed_at IS NULL",
    "CREATE INDEX IF NOT EXISTS credit_notes_refund_pending ON credit_notes (issued_at, id)"
    " WHERE status = 'refund_pending'",
)


class CreditNoteTaxRow(msgspec.Struct, frozen=True):
    name: str  # CGST | SGST | IGST
    rate: Decimal  # a fraction: 0.09 is 9 %
    amount: int  # paise


class CreditNoteLineRow(msgspec.Struct, frozen=True):
    index: int  # the invoice line credited; -1: a whole-invoice amount
    description: str
    taxable: int  # paise
    taxes: tuple[CreditNoteTaxRow, ...]


class ShareRow(msgspec.Struct, frozen=True):
    """One refund share: a captured payment, the paise refunded through it, and where it is."""

    payment_id: UUID
    razorpay_payment_id: str
    amount: int
    attempt: int = 0
    current: str | None = None  # the refund of the latest attempt
    refunds: dict[str, str] = msgspec.field(default_factory=dict)  # refund id -> status
    error: str | None = None  # the last failed request, until a retry
    status: str = ""  # processed | failed | pending | "" (not requested yet)


class CreditNoteRow(msgspec.Struct, frozen=True):
    """One credit note as the read model holds it. Amounts are paise."""

    id: UUID
    invoice_id: UUID
    organisation_id: UUID
    number: str
    invoice_number: str
    invoice_date: datetime
    reason: str
    settlement: str
    reference: str | None
    status: str  # issued | refund_pending | refunded | refund_failed
    currency: str
    lines: tuple[CreditNoteLineRow, ...]
    subtotal: int
    taxes: tuple[CreditNoteTaxRow, ...]
    total: int
    refunded: int
    shares: tuple[ShareRow, ...]
    country: str
    customer_state_code: str | None
    customer_gstin: str | None
    supplier_state_code: str
    issued_at: datetime
    updated_at: datetime
    emailed_at: datetime | None
    ledger_position: int


_COLUMNS = ", ".join(CreditNoteRow.__struct_fields__)


def _state(share: ShareRow) -> ShareState:
    return ShareState(share.attempt, share.current, dict(share.refunds), share.error)


def _share(share: ShareRow, state: ShareState) -> ShareRow:
    return ShareRow(share.payment_id, share.razorpay_payment_id, share.amount, state.attempt,
                    state.current, dict(state.refunds), state.error, state.status)


def _issued(cur: Cursor[Any], e: CreditNote.Issued, position: int) -> None:
    shares = [ShareRow(s.payment_id, s.razorpay_payment_id, s.amount) for s in e.refunds]
    status = note_status(e.settlement, [_state(s) for s in shares])
    cur.execute(
        f"INSERT INTO credit_notes ({_COLUMNS}, version) VALUES"
        f" ({', '.join(['%s'] * (len(CreditNoteRow.__struct_fields__) + 1))})",
        (e.originator_id, e.invoice_id, e.organisation_id, e.number, e.invoice_number,
         e.invoice_date, e.reason, e.settlement, e.reference, status, e.currency,
         Jsonb(msgspec.to_builtins(list(e.lines))), e.subtotal,
         Jsonb(msgspec.to_builtins(list(e.taxes))), e.total, 0,
         Jsonb(msgspec.to_builtins(shares)), e.country, e.customer_state_code, e.customer_gstin,
         e.supplier_state_code, e.timestamp, e.timestamp, None, position, e.originator_version),
    )


def _refund_event(cur: Cursor[Any], e: Any, position: int) -> None:
    row = cur.execute("SELECT settlement, shares FROM credit_notes WHERE id = %s",
                      (e.originator_id,)).fetchone()
    if row is None:
        raise LookupError(f"credit note {e.originator_id} is not in the read model")
    settlement, raw = row
    shares = list(msgspec.convert(raw, list[ShareRow]))
    shares[e.share] = _share(shares[e.share], share_after(_state(shares[e.share]), e))
    states = [_state(s) for s in shares]
    refunded = sum(s.amount for s, st in zip(shares, states, strict=True)
                   if st.status == "processed")
    cur.execute(
        "UPDATE credit_notes SET shares = %s, status = %s, refunded = %s, updated_at = %s,"
        " version = %s, ledger_position = %s WHERE id = %s",
        (Jsonb(msgspec.to_builtins(shares)), note_status(settlement, states), refunded,
         e.timestamp, e.originator_version, position, e.originator_id))
    require_row(cur, "credit note", e.originator_id)


def _emailed(cur: Cursor[Any], e: CreditNoteMail.Sent, position: int) -> None:
    cur.execute("UPDATE credit_notes SET emailed_at = %s WHERE id = %s",
                (e.timestamp, e.credit_note_id))


READ_MODEL = ReadModel(name=NAME, ddl=DDL, tables=("credit_notes",), handlers={
    CreditNote.Issued: _issued,
    CreditNote.RefundRequested: _refund_event,
    CreditNote.RefundRequestFailed: _refund_event,
    CreditNote.RefundObserved: _refund_event,
    CreditNote.RefundProcessed: _refund_event,
    CreditNoteMail.Sent: _emailed,
})


# ---- queries ----------------------------------------------------------------------------------

def get(conn: Connection[Any], ident: UUID) -> CreditNoteRow | None:
    """One credit note, or None."""
    return one_row(conn, CreditNoteRow, f"SELECT {_COLUMNS} FROM credit_notes WHERE id = %s",
                   (ident,))


def page(conn: Connection[Any], limit: int, after_cursor: tuple[datetime, UUID] | None, *,
         organisation_id: UUID | None = None, invoice_id: UUID | None = None,
         status: str | None = None) -> list[CreditNoteRow]:
    """Credit notes oldest first (issued_at, id), `limit` at most, after the cursor; each filter
    given narrows the list."""
    assert 0 < limit <= LIST_MAX_ROWS + 1
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if after_cursor is not None:
        where.append("(issued_at, id) > (%(at)s, %(id)s)")
        params |= {"at": after_cursor[0], "id": after_cursor[1]}
    for column, value in (("organisation_id", organisation_id), ("invoice_id", invoice_id),
                          ("status", status)):
        if value is not None:
            where.append(f"{column} = %({column})s")
            params[column] = value
    query = (f"SELECT {_COLUMNS} FROM credit_notes WHERE {' AND '.join(where)}"
             " ORDER BY issued_at, id LIMIT %(limit)s")
    return all_rows(conn, CreditNoteRow, query.encode(), params)


def not_emailed(conn: Connection[Any], limit: int) -> list[CreditNoteRow]:
    """Credit notes whose email has not been recorded as sent, oldest first."""
    assert 0 < limit <= LIST_MAX_ROWS
    return all_rows(conn, CreditNoteRow,
                    f"SELECT {_COLUMNS} FROM credit_notes WHERE emailed_at IS NULL"
                    " ORDER BY issued_at, id LIMIT %s", (limit,))


def unrequested(conn: Connection[Any], issued_before: datetime, limit: int) -> list[UUID]:
    """Refund notes issued before `issued_before` with a share never asked of Razorpay (the
    process stopped between issuing and asking): the scheduler asks for them, oldest first.
    A note refund_failed too: another share's failure must not hide a share never asked."""
    assert 0 < limit <= LIST_MAX_ROWS
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM credit_notes"
                    " WHERE status IN ('refund_pending', 'refund_failed')"
                    " AND shares @> '[{\"status\": \"\"}]'::jsonb AND issued_at < %s"
                    " ORDER BY issued_at, id LIMIT %s", (issued_before, limit))
        return [row[0] for row in cur.fetchall()]


def refunds_failed(conn: Connection[Any]) -> int:
    """How many credit notes' refunds failed (status refund_failed): for /metrics."""
    row = conn.execute("SELECT count(*) FROM credit_notes WHERE status = 'refund_failed'").fetchone()
    return int(row[0]) if row else 0
