"""Invoice emails: each finalized invoice goes to its organisation's billing email once, with
the HTML body and the PDF attached; once it is paid in full, a short payment confirmation goes
there once too; and when an invoice that was emailed is voided, a void notice goes there once.
A pass sends up to SEND_CONCURRENCY_MAX at once (a bounded queue of threads), so that a slow
mail server never holds up anything else. Each sending is recorded in the ledger
(InvoiceMail.Sent, kind "invoice", "payment" or "void"). A failed send is retried with
backoff now and again on the next pass of the scheduler.

"Once": the record is written after the server accepted the message; a crash between the two
sends it again with the same Message-ID, which receiving systems recognise as the same mail.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from uuid import UUID

from psycopg import Connection
from psycopg_pool import ConnectionPool

from adapters.documents import render_html, render_pdf
from adapters.ledger import LedgerStore
from adapters.mail import build_invoice_email, build_payment_email, build_void_email, send_with_retries
from domain.documents import DRAFT_NUMBER, DocumentLine, DocumentTier, InvoiceDocument
from domain.errors import Conflict, DomainError, NotFound
from domain.mail_record import InvoiceMail, mail_id
from domain.ports import Mailer
from domain.tax import TaxLine
from projections import invoices, organisations
from projections.invoices import INVOICE_MAIL, PAYMENT_MAIL, VOID_MAIL, InvoiceRow
from projections.organisations import OrganisationRow

log = logging.getLogger("billing.notifier")

PAYMENT_TERMS = timedelta(days=15)
SEND_ATTEMPTS = 3
SEND_BACKOFF_S = 0.5
PASS_MAX_INVOICES = 50
SEND_CONCURRENCY_MAX = 4  # emails rendered and sent at once by one pass

Due = Callable[[Connection[Any], int], list[InvoiceRow]]  # a query of invoices to email, at most n


@dataclass(frozen=True)
class Supplier:
    name: str
    gstin: str | None
    state_code: str
    sender: str


def document(invoice: InvoiceRow, org: OrganisationRow, supplier: Supplier) -> InvoiceDocument:
    """The invoice (in the read model's shape) as printed and mailed: the one place it is built."""
    issued = (invoice.finalized_at or datetime.now(UTC)).date()
    return InvoiceDocument(
        invoice_id=invoice.id, number=invoice.number or DRAFT_NUMBER, invoice_date=issued,
        period=invoice.period, due_date=issued + PAYMENT_TERMS, currency=invoice.currency,
        supplier_name=supplier.name, supplier_gstin=supplier.gstin,
        supplier_state_code=supplier.state_code, customer_name=org.name,
        # The tax facts the invoice was drafted with, never the organisation's current ones
        # (docs/INVOICES.md: a change applies from the next invoice); for invoices drafted before
        # they were recorded, the organisation's.
        customer_gstin=_recorded(invoice.tax_gstin, org.gstin),
        customer_state_code=invoice.tax_state_code if invoice.tax_country else org.state_code,
        customer_country=invoice.tax_country or org.country,
        billing_email=org.billing_email,
        lines=tuple(DocumentLine(line.description, line.quantity, line.amount, tuple(
            DocumentTier(t.tier, t.up_to, t.quantity, t.unit_price, t.flat_fee) for t in line.tiers))
                    for line in invoice.lines),
        subtotal=invoice.subtotal,
        taxes=tuple(TaxLine(t.name, t.rate, t.amount) for t in invoice.taxes),
        total=invoice.total, amount_due=invoice.amount_due,
        plan_name=invoice.plan_name or invoice.plan_code, plan_version=invoice.plan_version,
    )


def _recorded(gstin: str | None, current: str | None) -> str | None:
    """The GSTIN recorded on the invoice ("" = none), else (not recorded) the current one."""
    if gstin is None:
        return current
    return gstin or None


def render(pool: ConnectionPool, supplier: Supplier, invoice_id: UUID,
           fmt: str) -> tuple[bytes, str, str] | None:
    """An invoice as HTML or PDF (a draft is shown with the number DRAFT): the body, its media
    type and its file name (`INV-2627-000001.pdf`, a draft's `DRAFT-<id>.pdf`); None if
    unknown."""
    with pool.connection() as conn:
        row = invoices.get(conn, invoice_id)
        org = organisations.get(conn, row.organisation_id) if row else None
    if row is None or org is None:
        return None
    doc = document(row, org, supplier)  # a draft is shown with the number DRAFT
    if fmt == "pdf":
        return render_pdf(doc), "application/pdf", doc.pdf_filename
    return render_html(doc).encode(), "text/html; charset=utf-8", doc.file_stem + ".html"


class InvoiceNotifier:
    def __init__(self, pool: ConnectionPool, ledger: LedgerStore, mailer: Mailer,
                 supplier: Supplier) -> None:
        self._pool = pool
        self._ledger = ledger
        self._mailer = mailer
        self._supplier = supplier

    def send_due(self) -> tuple[int, int]:
        """One pass: email finalized invoices not emailed yet, then the payment confirmations of
        paid invoices not confirmed yet, then the void notices of emailed invoices voided since.
        Returns (sent, failed) over all three."""
        sent, failed = self._pass(invoices.not_emailed, self._send, "invoice")
        paid_sent, paid_failed = self._pass(invoices.paid_not_emailed, self._send_paid,
                                            "payment confirmation")
        void_sent, void_failed = self._pass(invoices.void_not_emailed, self._send_void,
                                            "void notice")
        return sent + paid_sent + void_sent, failed + paid_failed + void_failed

    def _pass(self, due_query: Due, send: Callable[[InvoiceRow, OrganisationRow], bool],
              what: str) -> tuple[int, int]:
        with self._pool.connection() as conn:
            due = due_query(conn, PASS_MAX_INVOICES)
            orgs = {row.organisation_id: organisations.get(conn, row.organisation_id)
                    for row in due}
        sent = failed = 0
        work = [(row, org) for row in due if (org := orgs[row.organisation_id]) is not None]
        if not work:
            return 0, 0
        # A bounded number at once: rendering and SMTP round trips overlap, and a slow mail
        # server holds up SEND_CONCURRENCY_MAX sends, never the invoice run (which sends none:
        # this pass, on the scheduler's email job, picks up what was finalized).
        with ThreadPoolExecutor(max_workers=min(SEND_CONCURRENCY_MAX, len(work)),
                                thread_name_prefix="invoice-mail") as pool:
            futures = [(row, pool.submit(send, row, org)) for row, org in work]
            for row, future in futures:
                try:
                    sent += future.result()
                except DomainError as e:
                    failed += 1
                    log.warning("invoice %s %s email not sent (will retry): %s", row.number,
                                what, e)
        return sent, failed

    def _sent_already(self, invoice_id: UUID, kind: str) -> bool:
        try:  # the ledger, not the (possibly lagging) read model, says whether it was sent
            self._ledger.get(mail_id(invoice_id, kind), InvoiceMail)
            return True
        except NotFound:
            return False

    def _record(self, row: InvoiceRow, kind: str, msg: EmailMessage, to: str,
                attempts: int) -> None:
        record = InvoiceMail.record(row.id, kind, str(msg["Message-ID"]), to, attempts,
                                    datetime.now(UTC))
        # Conflict: another process sent and recorded it too (with the same Message-ID).
        with contextlib.suppress(Conflict):
            self._ledger.save(record, actor=None)  # the notifier's own bookkeeping

    def _send(self, row: InvoiceRow, org: OrganisationRow) -> bool:
        if self._sent_already(row.id, INVOICE_MAIL):
            return False
        doc = document(row, org, self._supplier)
        msg = build_invoice_email(doc, render_html(doc), render_pdf(doc), org.billing_email,
                                  self._supplier.sender)
        attempts = send_with_retries(self._mailer, msg, SEND_ATTEMPTS, SEND_BACKOFF_S)
        self._record(row, INVOICE_MAIL, msg, org.billing_email, attempts)
        return True

    def _send_paid(self, row: InvoiceRow, org: OrganisationRow) -> bool:
        if self._sent_already(row.id, PAYMENT_MAIL):
            return False
        doc = document(row, org, self._supplier)
        msg = build_payment_email(doc, paid=row.paid, to=org.billing_email,
                                  sender=self._supplier.sender)
        attempts = send_with_retries(self._mailer, msg, SEND_ATTEMPTS, SEND_BACKOFF_S)
        self._record(row, PAYMENT_MAIL, msg, org.billing_email, attempts)
        return True

    def _send_void(self, row: InvoiceRow, org: OrganisationRow) -> bool:
        if self._sent_already(row.id, VOID_MAIL) or not self._sent_already(row.id, INVOICE_MAIL):
            return False  # sent before; or the invoice itself never went out (the ledger says)
        doc = document(row, org, self._supplier)
        msg = build_void_email(doc, reason=row.void_reason or "", to=org.billing_email,
                               sender=self._supplier.sender)
        attempts = send_with_retries(self._mailer, msg, SEND_ATTEMPTS, SEND_BACKOFF_S)
        self._record(row, VOID_MAIL, msg, org.billing_email, attempts)
        return True
