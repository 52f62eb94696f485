"""Credit note documents and email: HTML (Jinja2, autoescaped), plain text and PDF (Typst) from
a credit note in the read model's shape, and the notifier that emails each note once.

The view is a dict of already-formatted strings (money with Indian grouping, dates spelt out,
rates as percentages), built in one place (`credit_note_view`) for every template. The PDF is
deterministic (the issue date is its timestamp, only the typst wheel's fonts). "Once": the email
is recorded in the ledger (CreditNoteMail.Sent) after the server accepted it; a crash between
the two sends it again with the same Message-ID, which receivers recognise as the same mail.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import UTC, datetime, time
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import typst
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg_pool import ConnectionPool

from adapters.documents import TEMPLATES_DIR, long_date
from adapters.ledger import LedgerStore
from adapters.mail import FALLBACK_MAIL_DOMAIN, send_with_retries
from adapters.notifier import Supplier
from domain.credit_note import WHOLE_INVOICE, CreditNoteMail, credit_note_mail_id
from domain.documents import SAC_CODE, SAC_DESCRIPTION, indian_rupees, percent, state_label
from domain.errors import Conflict, DomainError, NotFound
from domain.numbering import FY_TIMEZONE
from domain.ports import Mailer
from domain.tax import INDIA
from projections import credit_notes, organisations
from projections.credit_notes import CreditNoteRow
from projections.organisations import OrganisationRow

log = logging.getLogger("billing.notifier")

HTML_TEMPLATE = "credit_note.html.j2"
TEXT_TEMPLATE = "credit_note.txt.j2"
PDF_TEMPLATE = "credit_note.typ"
TYPST_INPUT_KEY = "credit_note"
TITLE = "Credit Note"
FOOTER = ("This is a computer-generated credit note under section 34 of the CGST Act, 2017; "
          "it reduces the tax charged on the invoice named above.")
MAIL_KIND = "credit_note"  # in the Message-ID
SEND_ATTEMPTS = 3
SEND_BACKOFF_S = 0.5
PASS_MAX_NOTES = 50
REASON_LABELS = {"duplicate_charge": "Duplicate charge", "service_deficiency": "Service deficiency",
                 "order_change": "Change in order", "other": "Other"}
SETTLEMENT_LABELS = {"refund": "Refunded to the original payment method",
                     "out_of_band": "Returned outside the payment gateway",
                     "reduce_due": "Reduces the amount due on the invoice"}

_ENV = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
    keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
)


def _day(at: datetime) -> str:
    return long_date(at.astimezone(ZoneInfo(FY_TIMEZONE)).date())


def credit_note_view(note: CreditNoteRow, org: OrganisationRow, supplier: Supplier) -> dict[str, Any]:
    """The note as formatted strings: what every template shows, and nothing else."""
    settlement = SETTLEMENT_LABELS.get(note.settlement, note.settlement)
    if note.reference:
        settlement += f" (reference {note.reference})"
    return {
        "title": TITLE,
        "number": note.number,
        "issue_date": _day(note.issued_at),
        "invoice_number": note.invoice_number,
        "invoice_date": _day(note.invoice_date),
        "reason": REASON_LABELS.get(note.reason, note.reason),
        "settlement": settlement,
        "supplier": {"name": supplier.name, "gstin": supplier.gstin or "",
                     "state": state_label(note.supplier_state_code)},
        "customer": {"name": org.name, "gstin": note.customer_gstin or "Unregistered",
                     "state": (state_label(note.customer_state_code)
                               if note.country == INDIA and note.customer_state_code else ""),
                     "country": note.country},
        "sac_code": SAC_CODE,
        "sac_description": SAC_DESCRIPTION,
        "lines": [{"n": "—" if line.index == WHOLE_INVOICE else str(line.index + 1),
                   "description": line.description, "taxable": indian_rupees(line.taxable),
                   "tax": indian_rupees(sum(t.amount for t in line.taxes))}
                  for line in note.lines],
        "subtotal": indian_rupees(note.subtotal),
        "taxes": [{"name": t.name, "rate": percent(t.rate), "amount": indian_rupees(t.amount)}
                  for t in note.taxes],
        "total": indian_rupees(note.total),
        "currency": note.currency,
        "footer": FOOTER,
    }


def file_stem(note: CreditNoteRow) -> str:
    """CN/2627/000001 -> CN-2627-000001."""
    return note.number.replace("/", "-")


def render_html(view: dict[str, Any]) -> str:
    return _ENV.get_template(HTML_TEMPLATE).render(note=view)


def render_pdf(view: dict[str, Any], issued_at: datetime) -> bytes:
    stamp = datetime.combine(issued_at.date(), time(0, 0), tzinfo=UTC)
    return typst.compile(str(TEMPLATES_DIR / PDF_TEMPLATE), root=str(TEMPLATES_DIR), format="pdf",
                         sys_inputs={TYPST_INPUT_KEY: json.dumps(view, ensure_ascii=False)},
                         ignore_system_fonts=True, timestamp=stamp)


def render(pool: ConnectionPool, supplier: Supplier, credit_note_id: UUID,
           fmt: str) -> tuple[bytes, str, str] | None:
    """A note as HTML or PDF: the body, its media type and file name; None if unknown."""
    with pool.connection() as conn:
        note = credit_notes.get(conn, credit_note_id)
        org = organisations.get(conn, note.organisation_id) if note else None
    if note is None or org is None:
        return None
    view = credit_note_view(note, org, supplier)
    if fmt == "pdf":
        return render_pdf(view, note.issued_at), "application/pdf", file_stem(note) + ".pdf"
    return render_html(view).encode(), "text/html; charset=utf-8", file_stem(note) + ".html"


def build_email(note: CreditNoteRow, view: dict[str, Any], pdf: bytes, to: str,
                sender: str) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = f"Credit note {note.number} against invoice {note.invoice_number}"
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(datetime.now(UTC))
    domain = parseaddr(sender)[1].rpartition("@")[2] or FALLBACK_MAIL_DOMAIN
    msg["Message-ID"] = f"<{MAIL_KIND}.{note.id}@{domain}>"  # the same for every send
    msg.set_content(_ENV.get_template(TEXT_TEMPLATE).render(note=view))
    msg.add_alternative(render_html(view), subtype="html")
    msg.add_attachment(pdf, maintype="application", subtype="pdf",
                       filename=file_stem(note) + ".pdf")
    return msg


class CreditNoteNotifier:
    """Emails each credit note to its organisation's billing email once (PDF attached)."""

    def __init__(self, pool: ConnectionPool, ledger: LedgerStore, mailer: Mailer,
                 supplier: Supplier) -> None:
        self._pool = pool
        self._ledger = ledger
        self._mailer = mailer
        self._supplier = supplier

    def send_due(self) -> tuple[int, int]:
        """One pass over notes not emailed yet: (sent, failed)."""
        with self._pool.connection() as conn:
            due = credit_notes.not_emailed(conn, PASS_MAX_NOTES)
            orgs = {n.organisation_id: organisations.get(conn, n.organisation_id) for n in due}
        sent = failed = 0
        for note in due:
            org = orgs[note.organisation_id]
            if org is None:
                continue
            try:
                sent += self._send(note, org)
            except DomainError as e:
                failed += 1
                log.warning("credit note %s email not sent (will retry): %s", note.number, e)
        return sent, failed

    def _send(self, note: CreditNoteRow, org: OrganisationRow) -> bool:
        try:  # the ledger, not the (possibly lagging) read model, says whether it was sent
            self._ledger.get(credit_note_mail_id(note.id), CreditNoteMail)
            return False
        except NotFound:
            pass
        view = credit_note_view(note, org, self._supplier)
        msg = build_email(note, view, render_pdf(view, note.issued_at), org.billing_email,
                          self._supplier.sender)
        attempts = send_with_retries(self._mailer, msg, SEND_ATTEMPTS, SEND_BACKOFF_S)
        record = CreditNoteMail.record(note.id, str(msg["Message-ID"]), org.billing_email,
                                       attempts, datetime.now(UTC))
        with contextlib.suppress(Conflict):  # another process sent and recorded it too
            self._ledger.save(record, actor=None)
        return True
