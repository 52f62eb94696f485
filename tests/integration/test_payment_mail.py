"""The payment confirmation email on the real ledger: sent once per paid invoice (never for one
partly paid), through the notifier's pass that also sends the invoice emails, to the outbox."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path
from uuid import UUID

from adapters.mail import build_payment_email
from adapters.maintenance import rebuild
from domain.invoice import Invoice
from domain.mail_record import InvoiceMail, mail_id
from domain.services.invoicing import InvoicingService
from domain.services.payments import PaymentsService
from infra.wiring import Runtime
from projections import invoices, organisations
from tests.integration.test_invoice_numbering import DRAFTED_AT, FINALIZED_AT, draft, subscribed_orgs
from tests.unit.test_documents import make_doc

PAID_AT = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
CHEQUE = 10000  # paise paid on the partly paid invoice


def parse(path: Path) -> EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body(preferencelist=(kind,))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


def test_a_paid_invoice_gets_one_payment_email_and_a_partly_paid_one_none(runtime: Runtime) -> None:
    orgs = subscribed_orgs(runtime, 3)
    drafting = InvoicingService(runtime.ledger, lambda: DRAFTED_AT)
    finalizing = InvoicingService(runtime.ledger, lambda: FINALIZED_AT)
    paid, partial, unpaid = (
        finalizing.finalize(draft(runtime, drafting, org, 1000)[0].aggregate.id, actor=None).aggregate
        for org in orgs)
    payments = PaymentsService(runtime.ledger, lambda: PAID_AT, None)
    payments.record_manual(paid.id, amount=paid.total, method="bank_transfer", reference="UTR 1",
                           actor=None)
    payments.record_manual(partial.id, amount=CHEQUE, method="cheque", reference="CHQ 2", actor=None)
    assert runtime.ledger.get(partial.id, Invoice).status == "partially_paid"
    for model in (organisations.READ_MODEL, invoices.READ_MODEL):
        rebuild(runtime.pool, runtime.ledger, model)

    notifier = runtime.notifier()
    assert notifier.send_due() == (4, 0)  # three invoice emails, one payment confirmation
    # The read model has not seen the record yet: the ledger's record stops a second send.
    assert [r.id for r in read_paid_not_emailed(runtime)] == [paid.id]
    assert notifier.send_due() == (0, 0)
    runtime.ledger.get(mail_id(paid.id, "payment"), InvoiceMail)  # recorded (NotFound if not)

    outbox = runtime.settings.data_dir / "outbox"
    confirmations = sorted(outbox.glob("paid.*.eml"))
    assert [p.name for p in confirmations] == [f"paid.{paid.id}@localhost.eml"]
    assert len(list(outbox.glob("invoice.*.eml"))) == 3
    msg = parse(confirmations[0])
    assert msg["To"] == "ap0@example.in"
    assert "Payment received" in msg["Subject"] and str(paid.number) in msg["Subject"]
    assert not list(msg.iter_attachments())
    # org-0 is in Maharashtra (27), the supplier in Karnataka: 499.00 + 1000 x 0.0035 = 502.50,
    # IGST 18 % = 90.45, so 592.95 was paid and nothing is due.
    assert paid.total == 59295
    text = body(msg, "plain")
    assert "INR 592.95 for invoice" in text and str(paid.number) in text
    assert "Amount due:      INR 0.00" in text
    assert "INR 592.95" in body(msg, "html")

    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)
    assert read_paid_not_emailed(runtime) == []
    with runtime.pool.connection() as conn:
        emailed: dict[UUID, datetime | None] = dict(
            conn.execute("SELECT id, paid_emailed_at FROM invoices").fetchall())
    assert emailed[paid.id] is not None and emailed[partial.id] is None and emailed[unpaid.id] is None


def read_paid_not_emailed(runtime: Runtime) -> list[invoices.InvoiceRow]:
    with runtime.pool.connection() as conn:
        return invoices.paid_not_emailed(conn, 10)


def test_the_payment_email_escapes_customer_text_in_html_only() -> None:
    doc = make_doc(customer_name="Tom & Jerry <Traders>")
    msg = build_payment_email(doc, paid=1_234_567_89, to="ap@acme.in", sender="Billing <b@x.in>")
    assert msg["Message-ID"] == f"<paid.{doc.invoice_id}@x.in>"
    assert "Tom &amp; Jerry &lt;Traders&gt;" in body(msg, "html")
    assert "Dear Tom & Jerry <Traders>," in body(msg, "plain")
    assert "INR 12,34,567.89" in body(msg, "plain")  # Indian grouping, from integer paise
