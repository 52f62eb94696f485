"""The void notice on the real ledger (issue 21): an invoice that was emailed and then voided
gets one void notice; one voided before its email went out gets none."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from adapters.maintenance import rebuild
from domain.mail_record import InvoiceMail, mail_id
from domain.services.invoicing import InvoicingService
from infra.wiring import Runtime
from projections import invoices, organisations
from tests.integration.test_invoice_numbering import DRAFTED_AT, FINALIZED_AT, draft, subscribed_orgs
from tests.integration.test_payment_mail import body, parse

VOIDED_AT = datetime(2026, 11, 12, 9, 0, tzinfo=UTC)


def test_an_emailed_invoice_voided_gets_one_void_notice_and_an_unsent_one_none(runtime: Runtime) -> None:
    emailed_org, quiet_org = subscribed_orgs(runtime, 2)
    drafting = InvoicingService(runtime.ledger, lambda: DRAFTED_AT)
    finalizing = InvoicingService(runtime.ledger, lambda: FINALIZED_AT)
    emailed = finalizing.finalize(draft(runtime, drafting, emailed_org, 1000)[0].aggregate.id,
                                  actor=None).aggregate
    for model in (organisations.READ_MODEL, invoices.READ_MODEL):
        rebuild(runtime.pool, runtime.ledger, model)
    notifier = runtime.notifier()
    assert notifier.send_due() == (1, 0)  # the invoice email

    voiding = InvoicingService(runtime.ledger, lambda: VOIDED_AT)
    voiding.void(emailed.id, "wrong address", actor=None)
    quiet = draft(runtime, drafting, quiet_org, 1000)[0].aggregate
    voiding.void(quiet.id, "duplicate", actor=None)  # a draft: never emailed, so no notice
    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)
    assert notifier.send_due() == (1, 0)  # the void notice, once
    assert notifier.send_due() == (0, 0)  # the ledger's record stops a second one
    runtime.ledger.get(mail_id(emailed.id, "void"), InvoiceMail)  # recorded (NotFound if not)

    outbox = runtime.settings.data_dir / "outbox"
    notices = sorted(outbox.glob("void.*.eml"))
    assert [p.name for p in notices] == [f"void.{emailed.id}@localhost.eml"]
    msg = parse(notices[0])
    assert msg["Subject"] == f"Invoice {emailed.number} for {emailed.period} is void: please disregard it"
    assert not list(msg.iter_attachments())
    text = body(msg, "plain")
    assert f"Invoice {emailed.number}" in text and "has been voided: wrong address." in text
    assert "wrong address" in body(msg, "html")

    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)
    with runtime.pool.connection() as conn:
        assert invoices.void_not_emailed(conn, 10) == []
        sent: dict[UUID, datetime | None] = dict(
            conn.execute("SELECT id, void_emailed_at FROM invoices").fetchall())
    assert sent[emailed.id] is not None and sent[quiet.id] is None
