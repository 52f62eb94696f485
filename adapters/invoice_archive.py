"""Archiving finalized invoices (docs/AUDIT.md): each finalized invoice's PDF, as rendered now
from the invoices read model (adapters/notifier.render), goes to the object store under its
SHA-256, and a manifest per period names every invoice's number and PDF hash. The ref
`invoices/<period>` points at the period's latest manifest. Credit notes join when they exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import msgspec
from psycopg_pool import ConnectionPool

from adapters.archive import ObjectStore
from adapters.notifier import Supplier, render
from domain.period import parse_period

INVOICE_MANIFEST_FORMAT = "billing-invoice-archive-v1"
# Finalized invoices of a period: those with a number (paid and voided ones included; a draft
# has none). The invoices read model (projections/invoices.py) owns the table.
FINALIZED_SQL = ("SELECT id, number FROM invoices WHERE period = %s AND number IS NOT NULL"
                 " ORDER BY number, id")


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
        listed.append({"invoice_id": str(invoice_id), "number": number, "file": file_name,
                       "media_type": media_type, "bytes": len(body),
                       "sha256": store.put_bytes(body)})
    manifest = {"format": INVOICE_MANIFEST_FORMAT, "period": period, "invoices": listed}
    key = store.put_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    store.set_ref(f"invoices/{period}", key)
    return ArchivedInvoices(period, key, listed)
