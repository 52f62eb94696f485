"""Archiving finalized invoices (docs/AUDIT.md): each finalized invoice's PDF, as rendered now
from the invoices read model (adapters/notifier.render), goes to the object store under its
SHA-256, and a manifest per period names every invoice's number and PDF hash. The ref
`invoices/<period>` points at the period's latest manifest. Every issued credit note's PDF
(adapters/credit_note_documents.render) is archived the same way (`archive_credit_notes`).

On finalization: the scheduler's archive job (`archive_finalized`) archives every finalized
invoice not archived yet, a bounded batch a pass, and records each in `archived_invoices`
(invoice, number, PDF hash), so that each PDF is rendered and stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import msgspec
from psycopg_pool import ConnectionPool

from adapters import credit_note_documents
from adapters.archive import ObjectStore
from adapters.notifier import Supplier, render
from domain.period import parse_period

INVOICE_MANIFEST_FORMAT = "billing-invoice-archive-v1"
# Finalized invoices of a period: those with a number (paid and voided ones included; a draft
# has none). The invoices read model (projections/invoices.py) owns the table.
FINALIZED_SQL = ("SELECT id, number FROM invoices WHERE period = %s AND number IS NOT NULL"
                 " ORDER BY number, id")


ARCHIVE_BATCH_MAX = 200  # invoices rendered and archived per pass of the archive job
DDL = (
    """CREATE TABLE IF NOT EXISTS archived_invoices (
        invoice_id uuid PRIMARY KEY,
        number text NOT NULL,
        sha256 text NOT NULL,
        archived_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS archived_credit_notes (
        credit_note_id uuid PRIMARY KEY,
        number text NOT NULL,
        sha256 text NOT NULL,
        archived_at timestamptz NOT NULL DEFAULT now()
    )""",
)
# Issued credit notes with no archived PDF yet, oldest first (projections/credit_notes.py).
NOTES_NOT_ARCHIVED_SQL = ("SELECT n.id, n.number FROM credit_notes n LEFT JOIN archived_credit_notes a"
                          " ON a.credit_note_id = n.id WHERE a.credit_note_id IS NULL"
                          " ORDER BY n.issued_at, n.id LIMIT %s")
NOTE_RECORD_SQL = ("INSERT INTO archived_credit_notes (credit_note_id, number, sha256)"
                   " VALUES (%s, %s, %s) ON CONFLICT (credit_note_id) DO NOTHING")
# Finalized invoices with no archived PDF yet, oldest finalization first.
NOT_ARCHIVED_SQL = ("SELECT i.id, i.number FROM invoices i LEFT JOIN archived_invoices a"
                    " ON a.invoice_id = i.id WHERE i.number IS NOT NULL AND a.invoice_id IS NULL"
                    " ORDER BY i.finalized_at NULLS LAST, i.id LIMIT %s")
RECORD_SQL = ("INSERT INTO archived_invoices (invoice_id, number, sha256) VALUES (%s, %s, %s)"
              " ON CONFLICT (invoice_id) DO NOTHING")


def archive_finalized(pool: ConnectionPool, supplier: Supplier, store: ObjectStore,
                      limit: int = ARCHIVE_BATCH_MAX) -> int:
    """Archive the PDFs of up to `limit` finalized invoices not archived yet; how many."""
    with pool.connection() as conn:
        rows: list[tuple[UUID, str]] = conn.execute(NOT_ARCHIVED_SQL, (limit,)).fetchall()
    done = 0
    for invoice_id, number in rows:
        rendered = render(pool, supplier, invoice_id, "pdf")
        if rendered is None:
            continue
        key = store.put_bytes(rendered[0])
        with pool.connection() as conn:
            conn.execute(RECORD_SQL, (invoice_id, number, key))
        done += 1
    return done


def archive_credit_notes(pool: ConnectionPool, supplier: Supplier, store: ObjectStore,
                         limit: int = ARCHIVE_BATCH_MAX) -> int:
    """Archive the PDFs of up to `limit` issued credit notes not archived yet; how many. A
    note's document never changes once issued (its refunds are not printed on it)."""
    with pool.connection() as conn:
        rows: list[tuple[UUID, str]] = conn.execute(NOTES_NOT_ARCHIVED_SQL, (limit,)).fetchall()
    done = 0
    for note_id, number in rows:
        rendered = credit_note_documents.render(pool, supplier, note_id, "pdf")
        if rendered is None:
            continue
        key = store.put_bytes(rendered[0])
        with pool.connection() as conn:
            conn.execute(NOTE_RECORD_SQL, (note_id, number, key))
        done += 1
    return done


@dataclass(frozen=True)
class ArchivedInvoices:
    period: str
    manifest_key: str
    invoices: list[dict[str, object]]


def archive_invoices(pool: ConnectionPool, supplier: Supplier, store: ObjectStore,
                     period: str) -> ArchivedInvoices:
    """Archive the PDF of every finalized invoice of `period`, then the manifest naming them."""
    parse_period(period)
    with pool.connection() as conn:
        rows: list[tuple[UUID, str]] = conn.execute(FINALIZED_SQL, (period,)).fetchall()
    listed: list[dict[str, object]] = []
    for invoice_id, number in rows:
        rendered = render(pool, supplier, invoice_id, "pdf")
        if rendered is None:
            continue
        body, media_type, file_name = rendered
        key = store.put_bytes(body)
        listed.append({"invoice_id": str(invoice_id), "number": number, "file": file_name,
                       "media_type": media_type, "bytes": len(body), "sha256": key})
        with pool.connection() as conn:
            conn.execute(RECORD_SQL, (invoice_id, number, key))
    manifest = {"format": INVOICE_MANIFEST_FORMAT, "period": period, "invoices": listed}
    key = store.put_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    store.set_ref(f"invoices/{period}", key)
    return ArchivedInvoices(period, key, listed)
