"""The invoices read model: one row per invoice with its lines, taxes, amounts and status.

`lines` and `taxes` are JSON with every decimal (quantities, rates) written as a decimal
string, so nothing passes through a float; amounts are bigint paise. A row follows its invoice
through the lifecycle (draft -> finalized -> partially_paid -> paid, or void): each payment
applied lowers `amount_due` and adds to `paid`; each credit note adds to `credited` (and a
reduce_due note lowers `amount_due`), and money returned (processed refunds, out_of_band)
adds to `refunded`. The ledger stays the truth and a rebuild from
position 0 gives the same rows.

Its queries answer `InvoiceRow`s; `row_of` gives the same shape for an invoice as saved in the
ledger, so the API's view and the printed document are each built from one shape in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor, sql
from psycopg.types.json import Jsonb

from domain.credit_note import OUT_OF_BAND, CreditNote
from domain.invoice import PAID, PAYABLE, Invoice
from domain.mail_record import InvoiceMail
from domain.tax import TaxName
from projections.base import ReadModel, all_rows, one_row, require_row

NAME = "invoices"
LIST_MAX_ROWS = 1000
INVOICE_MAIL = "invoice"  # InvoiceMail kinds: the invoice itself, and its payment confirmation
PAYMENT_MAIL = "payment"
VOID_MAIL = "void"  # the void notice of an invoice that had been emailed

DDL = (
    """CREATE TABLE IF NOT EXISTS invoices (
        id uuid PRIMARY KEY,
        organisation_id uuid NOT NULL,
        period text NOT NULL,
        revision integer NOT NULL,
        status text NOT NULL,
        number text,
        currency text NOT NULL,
        lines jsonb NOT NULL,
        subtotal bigint NOT NULL,
        taxes jsonb NOT NULL,
        total bigint NOT NULL,
        amount_due bigint NOT NULL,
        plan_code text NOT NULL,
        plan_version integer NOT NULL,
        usage_position bigint NOT NULL,
        void_reason text,
        created_at timestamptz NOT NULL,
        finalized_at timestamptz,
        voided_at timestamptz,
        updated_at timestamptz NOT NULL,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS invoices_by_organisation ON invoices (organisation_id, period)",
    "CREATE INDEX IF NOT EXISTS invoices_by_period ON invoices (period, organisation_id)",
    "CREATE INDEX IF NOT EXISTS invoices_by_created ON invoices (created_at, id)",
    # Numbers are unique by construction (domain.numbering); a duplicate here is a bug that
    # must stop this view loudly (dead letter) rather than show two invoices with one number.
    "CREATE UNIQUE INDEX IF NOT EXISTS invoices_by_number ON invoices (number) WHERE number IS NOT NULL",
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS emailed_at timestamptz",
    # The customer's tax facts the invoice was drafted with (its document shows these, never
    # the organisation's current ones). tax_gstin NULL: not recorded (drafted before it was).
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS tax_country text",
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS tax_state_code text",
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS tax_gstin text",
    # Paise applied from payments (total - amount_due), and when the payment confirmation was
    # emailed (emailed_at is the invoice email's).
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS paid bigint NOT NULL DEFAULT 0",
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS paid_emailed_at timestamptz",
    # The plan version's name when drafted; NULL: drafted before it was recorded.
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS plan_name text",
    # When the void notice of an emailed invoice was emailed (NULL: not yet, or not owed).
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS void_emailed_at timestamptz",
    # Credit notes (docs/CREDIT_NOTES.md): paise credited (tax included), and paise of what was
    # paid returned to the customer (processed Razorpay refunds and out_of_band returns).
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS credited bigint NOT NULL DEFAULT 0",
    "ALTER TABLE invoices ADD COLUMN IF NOT EXISTS refunded bigint NOT NULL DEFAULT 0",
)


def _drafted(cur: Cursor[Any], e: Invoice.Drafted, position: int) -> None:
    # The draft as the aggregate it creates, in the row's shape: the one mapping of an invoice
    # to its row (row_of), shared with what finalize and void answer.
    invoice = e.mutate(None)
    assert isinstance(invoice, Invoice)
    row = row_of(invoice, position)
    values = msgspec.structs.asdict(row) | {
        "lines": Jsonb(msgspec.to_builtins(list(row.lines))),
        "taxes": Jsonb(msgspec.to_builtins(list(row.taxes))),
        "version": e.originator_version,
    }
    cur.execute(
        sql.SQL("INSERT INTO invoices ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(map(sql.Placeholder, values))),
        values,
    )


def _update(cur: Cursor[Any], e: Any, position: int, assignments: str, values: tuple[Any, ...]) -> None:
    cur.execute(
        f"UPDATE invoices SET {assignments}, updated_at = %s, version = %s, ledger_position = %s"
        " WHERE id = %s",
        (*values, e.timestamp, e.originator_version, position, e.originator_id),
    )
    require_row(cur, "invoice", e.originator_id)


def _finalized(cur: Cursor[Any], e: Invoice.Finalized, position: int) -> None:
    _update(cur, e, position, "status = 'finalized', number = %s, finalized_at = %s",
            (e.number, e.finalized_at))


def _voided(cur: Cursor[Any], e: Invoice.Voided, position: int) -> None:
    _update(cur, e, position, "status = 'void', void_reason = %s, voided_at = %s",
            (e.reason, e.timestamp))


def _payment_applied(cur: Cursor[Any], e: Invoice.PaymentApplied, position: int) -> None:
    # As domain.invoice does: paid once nothing is due, partly paid until then (the CASE reads
    # the amount due before this update).
    _update(cur, e, position,
            "amount_due = amount_due - %s, paid = paid + %s,"
            " status = CASE WHEN amount_due - %s <= 0 THEN 'paid' ELSE 'partially_paid' END",
            (e.amount, e.amount, e.amount))


def _credited(cur: Cursor[Any], e: Invoice.Credited, position: int) -> None:
    # As domain.invoice does: a reduce_due note lowers the amount due (a partly paid invoice with
    # nothing left due is paid); out_of_band money is returned as the note is issued.
    returned_now = e.returned if e.settlement == OUT_OF_BAND else 0
    _update(cur, e, position,
            "credited = credited + %s, refunded = refunded + %s, amount_due = amount_due - %s,"
            " status = CASE WHEN %s > 0 AND amount_due - %s <= 0 AND status = 'partially_paid'"
            " THEN 'paid' ELSE status END",
            (e.total, returned_now, e.reduce_due, e.reduce_due, e.reduce_due))


def _refund_processed(cur: Cursor[Any], e: CreditNote.RefundProcessed, position: int) -> None:
    cur.execute("UPDATE invoices SET refunded = refunded + %s WHERE id = %s",
                (e.amount, e.invoice_id))
    require_row(cur, "invoice", e.invoice_id)


def _emailed(cur: Cursor[Any], e: InvoiceMail.Sent, position: int) -> None:
    if e.kind == INVOICE_MAIL:
        cur.execute("UPDATE invoices SET emailed_at = %s WHERE id = %s", (e.timestamp, e.invoice_id))
    elif e.kind == PAYMENT_MAIL:
        cur.execute("UPDATE invoices SET paid_emailed_at = %s WHERE id = %s",
                    (e.timestamp, e.invoice_id))
    elif e.kind == VOID_MAIL:
        cur.execute("UPDATE invoices SET void_emailed_at = %s WHERE id = %s",
                    (e.timestamp, e.invoice_id))


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("invoices",),
    handlers={
        Invoice.Drafted: _drafted,
        Invoice.Finalized: _finalized,
        Invoice.Voided: _voided,
        Invoice.PaymentApplied: _payment_applied,
        InvoiceMail.Sent: _emailed,
        Invoice.Credited: _credited,
        CreditNote.RefundProcessed: _refund_processed,
    },
)



class InvoiceLineTierRow(msgspec.Struct, frozen=True):
    """One tier of a tiered charge's line (decimals as strings in the JSON); prices in rupees."""

    tier: int  # 1-based place in the plan's tiers
    up_to: Decimal | None  # None: the open-ended last tier
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal


class InvoiceLineRow(msgspec.Struct, frozen=True):
    """One line as the read model holds it (JSON, the quantity a decimal string)."""

    description: str
    metric: str | None  # None: not a metered line (the base fee, the minimum)
    quantity: Decimal
    amount: int  # paise
    tiers: tuple[InvoiceLineTierRow, ...] = ()  # a tiered charge's breakdown; () before it was kept


class InvoiceTaxRow(msgspec.Struct, frozen=True):
    name: TaxName  # CGST | SGST | IGST
    rate: Decimal  # a fraction: 0.09 is 9 %
    amount: int  # paise


class InvoiceRow(msgspec.Struct, frozen=True):
    """One invoice as the read model holds it. Amounts are paise."""

    id: UUID
    organisation_id: UUID
    period: str
    revision: int
    status: str
    number: str | None  # None until finalized
    currency: str
    lines: tuple[InvoiceLineRow, ...]
    subtotal: int
    taxes: tuple[InvoiceTaxRow, ...]
    total: int
    amount_due: int
    paid: int  # applied from payments: total - amount_due
    plan_code: str
    plan_version: int
    usage_position: int
    void_reason: str | None
    created_at: datetime
    finalized_at: datetime | None
    voided_at: datetime | None
    updated_at: datetime
    ledger_position: int
    # The customer's tax facts when drafted; tax_gstin "" = it had none, None = not recorded.
    tax_country: str | None
    tax_state_code: str | None
    tax_gstin: str | None
    plan_name: str | None = None  # None: not recorded (drafted before it was); show plan_code
    credited: int = 0  # paise credited by credit notes (tax included)
    refunded: int = 0  # paise of what was paid returned (processed refunds, out_of_band)


def row_of(invoice: Invoice, position: int) -> InvoiceRow:
    """An invoice as saved in the ledger (its last event at `position`), in the read model's
    shape: what finalize and void answer, without waiting for the read model."""
    return InvoiceRow(
        id=invoice.id, organisation_id=invoice.organisation_id, period=invoice.period,
        revision=invoice.revision, status=invoice.status, number=invoice.number,
        currency=invoice.currency,
        lines=msgspec.convert(invoice.lines, tuple[InvoiceLineRow, ...], from_attributes=True),
        subtotal=invoice.subtotal,
        taxes=msgspec.convert(invoice.taxes, tuple[InvoiceTaxRow, ...], from_attributes=True),
        total=invoice.total, amount_due=invoice.amount_due, paid=invoice.paid,
        plan_code=invoice.plan_code,
        plan_version=invoice.plan_version, usage_position=invoice.usage_position,
        void_reason=invoice.void_reason, created_at=invoice.created_on,
        finalized_at=invoice.finalized_at, voided_at=invoice.voided_at,
        updated_at=invoice.modified_on, ledger_position=position, tax_country=invoice.country,
        tax_state_code=invoice.state_code, tax_gstin=invoice.gstin, plan_name=invoice.plan_name,
        credited=invoice.credited,
    )


_COLUMNS = (
    "id, organisation_id, period, revision, status, number, currency, lines, subtotal, taxes,"
    " total, amount_due, paid, plan_code, plan_version, usage_position, void_reason, created_at,"
    " finalized_at, voided_at, updated_at, ledger_position, tax_country, tax_state_code, tax_gstin,"
    " plan_name, credited, refunded"
)


# ---- queries ----------------------------------------------------------------------------------

def get(conn: Connection[Any], ident: UUID) -> InvoiceRow | None:
    """One invoice, or None."""
    return one_row(conn, InvoiceRow, f"SELECT {_COLUMNS} FROM invoices WHERE id = %s", (ident,))


class ListedInvoiceRow(InvoiceRow, frozen=True):
    """An invoice as listed: with its organisation's name (None while the organisations read
    model has not yet seen the organisation; it is a separate projector)."""

    organisation_name: str | None = None


_LISTED_COLUMNS = ", ".join(f"i.{c.strip()}" for c in _COLUMNS.split(",")) + ", o.name AS organisation_name"


def page(
    conn: Connection[Any],
    limit: int,
    after_cursor: tuple[datetime, UUID] | None,
    organisation_id: UUID | None = None,
    status: str | None = None,
    period: str | None = None,
    *,
    number: str | None = None,
    newest_first: bool = False,
) -> list[ListedInvoiceRow]:
    """Invoices oldest first (created_at, id), or newest first, `limit` at most, after the
    cursor (the last invoice of the previous page, in the same order); each filter given
    narrows the list."""
    assert 0 < limit <= LIST_MAX_ROWS + 1  # one more than a page: is there a next one?
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if after_cursor is not None:
        beyond = "<" if newest_first else ">"
        where.append(f"(i.created_at, i.id) {beyond} (%(at)s, %(id)s)")
        params |= {"at": after_cursor[0], "id": after_cursor[1]}
    for column, value in (("organisation_id", organisation_id), ("status", status),
                          ("period", period), ("number", number)):
        if value is not None:
            where.append(f"i.{column} = %({column})s")
            params[column] = value
    direction = "DESC" if newest_first else "ASC"
    sql = (f"SELECT {_LISTED_COLUMNS} FROM invoices i LEFT JOIN organisations o"
           f" ON o.id = i.organisation_id WHERE {' AND '.join(where)}"
           f" ORDER BY i.created_at {direction}, i.id {direction} LIMIT %(limit)s")
    return all_rows(conn, ListedInvoiceRow, sql.encode(), params)


def outstanding(conn: Connection[Any], organisation_id: UUID) -> int:
    """Paise the organisation still owes: the amount due of its finalized and partly paid
    invoices."""
    row = conn.execute(
        "SELECT COALESCE(sum(amount_due), 0) FROM invoices WHERE organisation_id = %s"
        " AND status = ANY(%s)",
        (organisation_id, list(PAYABLE)),
    ).fetchone()
    return int(row[0]) if row else 0


def billed_and_paid(conn: Connection[Any], organisation_id: UUID) -> tuple[int, int]:
    """Paise invoiced to the organisation (the totals of its finalized, partly paid and paid
    invoices) and paid against them (what payments applied)."""
    row = conn.execute(
        "SELECT COALESCE(sum(total), 0), COALESCE(sum(paid), 0) FROM invoices"
        " WHERE organisation_id = %s AND status = ANY(%s)",
        (organisation_id, [*PAYABLE, "paid"]),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def credited_and_refunded(conn: Connection[Any], organisation_id: UUID) -> tuple[int, int]:
    """Paise credited by credit notes on the organisation's finalized, partly paid and paid
    invoices, and paise of what was paid returned to it (processed refunds, out_of_band)."""
    row = conn.execute(
        "SELECT COALESCE(sum(credited), 0), COALESCE(sum(refunded), 0) FROM invoices"
        " WHERE organisation_id = %s AND status = ANY(%s)",
        (organisation_id, [*PAYABLE, "paid"]),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def existing_for_period(conn: Connection[Any], period: str) -> dict[UUID, str]:
    """Organisations that already have an invoice for `period`, with the status of their
    newest revision ('void' included: a voided period is not re-drafted by a run)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT ON (organisation_id) organisation_id, status FROM invoices"
            " WHERE period = %s ORDER BY organisation_id, revision DESC",
            (period,),
        )
        return {row[0]: str(row[1]) for row in cur.fetchall()}


def existing_of(conn: Connection[Any], period: str, org_ids: Sequence[UUID]) -> dict[UUID, str]:
    """existing_for_period, for `org_ids` only (one batch of an invoice run)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT ON (organisation_id) organisation_id, status FROM invoices"
            " WHERE period = %s AND organisation_id = ANY(%b::uuid[])"
            " ORDER BY organisation_id, revision DESC",
            (period, list(org_ids)),
        )
        return {row[0]: str(row[1]) for row in cur.fetchall()}


def billing_invoices_of(conn: Connection[Any], periods: list[str], org_ids: Sequence[UUID]
                        ) -> dict[UUID, list[UUID]]:
    """billing_invoices, for `org_ids` only (one batch of an invoice run)."""
    out: dict[UUID, list[UUID]] = {}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT organisation_id, id FROM invoices WHERE period = ANY(%s) AND status <> 'void'"
            " AND organisation_id = ANY(%b::uuid[]) ORDER BY organisation_id, period, revision",
            (periods, list(org_ids)),
        )
        for organisation_id, ident in cur.fetchall():
            out.setdefault(organisation_id, []).append(ident)
    return out


def drafts_of_period(conn: Connection[Any], period: str, after: UUID | None, limit: int
                     ) -> list[UUID]:
    """Ids of the period's drafts, in id order, the next `limit` after `after`."""
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM invoices WHERE period = %(period)s AND status = 'draft'"
                    " AND (%(after)s::uuid IS NULL OR id > %(after)s)"
                    " ORDER BY id LIMIT %(limit)s", {"period": period, "after": after,
                                                     "limit": limit})
        return [row[0] for row in cur.fetchall()]


def not_emailed(conn: Connection[Any], limit: int) -> list[InvoiceRow]:
    """Finalized (or partly or wholly paid) invoices whose email has not been recorded as sent,
    oldest first."""
    assert 0 < limit <= LIST_MAX_ROWS
    return all_rows(conn, InvoiceRow,
                    f"SELECT {_COLUMNS} FROM invoices WHERE emailed_at IS NULL"
                    " AND status IN ('finalized', 'partially_paid', 'paid')"
                    " ORDER BY finalized_at LIMIT %s", (limit,))


def paid_not_emailed(conn: Connection[Any], limit: int) -> list[InvoiceRow]:
    """Paid invoices whose payment confirmation has not been recorded as sent, oldest first."""
    assert 0 < limit <= LIST_MAX_ROWS
    return all_rows(conn, InvoiceRow,
                    f"SELECT {_COLUMNS} FROM invoices WHERE paid_emailed_at IS NULL"
                    " AND status = %s ORDER BY finalized_at, id LIMIT %s", (PAID, limit))


def void_not_emailed(conn: Connection[Any], limit: int) -> list[InvoiceRow]:
    """Void invoices that had been emailed and whose void notice has not been recorded as sent,
    oldest void first (an invoice voided before its email went out owes no notice)."""
    assert 0 < limit <= LIST_MAX_ROWS
    return all_rows(conn, InvoiceRow,
                    f"SELECT {_COLUMNS} FROM invoices WHERE status = 'void'"
                    " AND emailed_at IS NOT NULL AND void_emailed_at IS NULL"
                    " ORDER BY voided_at, id LIMIT %s", (limit,))


def billing_invoices(conn: Connection[Any], periods: list[str]) -> dict[UUID, list[UUID]]:
    """organisation -> ids of its invoices for `periods` that bill something: every status but
    void (a draft bills what it was drafted with; drafts are never re-priced). Where late usage
    is compared with what was billed (adapters.invoice_run)."""
    out: dict[UUID, list[UUID]] = {}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT organisation_id, id FROM invoices WHERE period = ANY(%s) AND status <> 'void'"
            " ORDER BY organisation_id, period, revision",
            (periods,),
        )
        for organisation_id, ident in cur.fetchall():
            out.setdefault(organisation_id, []).append(ident)
    return out
