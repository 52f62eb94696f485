"""Reconciliation is a replay: after a mixed workload (usage with duplicates, an invoice run,
payments whose webhooks come twice and out of order, against the fake Razorpay through the SDK)
`billing reconcile` reports ok; rows edited by hand in three read models are reported, exactly
those three, with their positions, and the CLI exits non-zero; a rebuild makes it ok again; an
emptied read model against a non-empty ledger fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import msgspec
import psycopg
import pytest
from eventsourcing.utils import get_topic

from adapters import bookkeeping
from adapters.maintenance import rebuild
from adapters.payment_manager import PaymentManager
from adapters.usage_writer import encode_usage
from domain.errors import NotFound
from domain.gateway_events import PaymentEntity, webhook_body
from domain.invoice import Invoice
from domain.payment import Payment, gateway_event_ref, razorpay_payment_ref
from domain.services.payments import PaymentsService
from domain.usage import Usage, UsageFact
from infra.cli import _operate, _parser
from infra.fake_razorpay import FakeRazorpay
from infra.reconcile import reconcile, reconcile_once
from infra.wiring import Runtime, read_model
from projections import reconciliations
from tests.conftest import ThreadedWriter
from tests.integration.invoice_run_steps import caught_up, live_runtime, now
from tests.integration.test_late_usage import OCTOBER, calls_tenant
from tests.integration.test_payment_manager import finalized

KEY_ID = "rzp_test_reconcile0001"
KEY_SECRET = "reconcile-test-key-secret-0123456789"
CONTROL_TIMEOUT_S = 5.0
CREDITED_PAISE = 1_180  # ₹10 + 18 % GST of the paid invoice, credited and refunded


@pytest.fixture
def fake() -> Iterator[FakeRazorpay]:
    with FakeRazorpay(key_id=KEY_ID, key_secret=KEY_SECRET) as server:
        yield server


def control(fake: FakeRazorpay, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(fake.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=CONTROL_TIMEOUT_S) as answer:
        return json.loads(answer.read())


def billing(rt: Runtime, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = _operate(rt, _parser().parse_args(list(argv)))
    return code, out.getvalue()


def workload(rt: Runtime, writer: ThreadedWriter) -> Invoice:
    """Usage sent twice, an invoice run, its finalization, and a payment through the fake
    Razorpay whose webhooks arrive captured-first, then authorized, then captured again."""
    tenant = calls_tenant((rt, writer))
    facts = [UsageFact(f"evt-{n}", "calls", tenant_value(n), OCTOBER + timedelta(minutes=n), {})
             for n in range(40)]
    rows = [encode_usage(tenant.key, fact, now()) for fact in facts]
    writer.submit(rows).result(10)
    position = writer.submit(rows[:25]).result(10).position  # the same events again: duplicates
    tenant.caught_up(max(position, rt.ledger.head()))
    invoice = tenant.finalize(tenant.drafted("2026-10"))
    gateway = rt.gateway()
    assert gateway is not None
    payments = PaymentsService(rt.ledger, now, gateway, key_secret=KEY_SECRET)
    order = payments.create_order(invoice.id, actor=None)
    paid = control(_fake_of(rt), "POST", f"/_fake/orders/{order.razorpay_order_id}/payments",
                   {"outcome": "captured", "deliver": False})["payment"]
    entity = PaymentEntity(paid["id"], paid["amount"], "INR", "captured",
                           order.razorpay_order_id, "upi", captured=True)
    authorized = msgspec.structs.replace(entity, status="authorized", captured=False)
    for event_id, kind, payment in (("evt_cap", "payment.captured", entity),
                                    ("evt_auth", "payment.authorized", authorized),
                                    ("evt_cap", "payment.captured", entity)):
        payments.record_delivery(event_id=event_id, body=webhook_body(kind, payment=payment))
    asyncio.run(PaymentManager(rt.ledger, rt.pool, payments).step())
    caught_up(rt)
    # A credit note of part of the paid invoice, refunded through the fake Razorpay; the
    # refund's webhooks arrive twice each, processed before created.
    notes = rt.credit_notes()
    note = notes.issue(invoice.id, reason="service_deficiency", settlement="refund",
                       amount=CREDITED_PAISE, actor=None).aggregate
    notes.request_refunds(note.id, actor=None)  # as the API does right after issuing
    fake = _fake_of(rt)
    refund_events = [e for e in fake.events() if e["type"].startswith("refund.")]
    assert len(refund_events) == 2, refund_events
    for e in sorted(refund_events, key=lambda e: e["type"] == "refund.created") * 2:
        payments.record_delivery(event_id=e["id"], body=e["body"].encode())
    asyncio.run(PaymentManager(rt.ledger, rt.pool, payments).step())
    caught_up(rt)
    assert rt.credit_notes().note(note.id).status == "refunded"
    return rt.ledger.get(invoice.id, Invoice)


def tenant_value(n: int) -> Decimal:
    return Decimal(1 + n % 3)


_FAKES: dict[str, FakeRazorpay] = {}


def _fake_of(rt: Runtime) -> FakeRazorpay:
    return _FAKES[rt.settings.razorpay_base_url or ""]


@pytest.fixture
def live(runtime: Runtime, fake: FakeRazorpay) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    settings = dataclasses.replace(runtime.settings, razorpay_key_id=KEY_ID,
                                   razorpay_key_secret=KEY_SECRET, razorpay_base_url=fake.url)
    rt = dataclasses.replace(runtime, settings=settings)
    _FAKES[fake.url] = fake
    try:
        with live_runtime(rt) as both:
            yield both
    finally:
        rt.close_gateway()
        _FAKES.pop(fake.url, None)


def test_a_mixed_workload_reconciles_and_three_edits_are_exactly_three_differences(
        live: tuple[Runtime, ThreadedWriter]) -> None:
    rt, writer = live
    invoice = workload(rt, writer)
    assert invoice.status == "paid"

    code, printed = billing(rt, "reconcile")
    assert code == 0, printed
    assert "ok" in printed.splitlines()[0]
    caught_up(rt)
    with rt.pool.connection() as conn:
        newest = reconciliations.latest(conn, 1)
    assert newest and newest[0].ok and len(newest[0].report_sha256) == 64
    with rt.pool.connection() as conn:
        recorded = reconciliations.get(conn, newest[0].id)
    assert recorded is not None
    compared = {c["name"]: (c["compared"], c["facts"]) for c in recorded.report["checks"]}
    assert compared["invoices"] == (1, 1)  # the invoice, priced afresh
    # The note against its invoice, the invoice's credited total, CN/..../000001 once.
    assert compared["credit_notes"] == (3, 1)
    assert compared["hash_chain"][0] == compared["hash_chain"][1] > 0  # every entry, sealed
    assert compared["numbering"][0] == 1  # INV/..../000001, issued once, on it
    assert compared["payments"][0] >= 2  # applied as its invoice says; refunds within capture
    assert "gateway" in str(recorded.report["checks"][2]["note"])
    # Another organisation, with no credit note of its own: the first one's note is not a fact
    # its reconciliation must have compared (it would be a "silent" check, a false failure).
    other = calls_tenant((rt, writer))
    caught_up(rt)
    scoped, _ = reconcile(rt, actor=None, organisation_id=other.org.id)
    assert scoped.ok, [c for c in scoped.checks if not c.ok]

    with rt.pool.connection() as conn:
        usage_position = conn.execute(
            "UPDATE usage_totals SET sum = sum + 1 WHERE granularity = 'day' AND ctid = ("
            " SELECT ctid FROM usage_totals WHERE granularity = 'day' LIMIT 1)"
            " RETURNING latest_position").fetchone()
        invoice_position = conn.execute(
            "UPDATE invoices SET total = total + 100 WHERE id = %s RETURNING ledger_position",
            (invoice.id,)).fetchone()
        payment_position = conn.execute(
            "UPDATE payments SET refunded = 5 WHERE ctid = (SELECT ctid FROM payments LIMIT 1)"
            " RETURNING ledger_position").fetchone()
    assert usage_position and invoice_position and payment_position

    code, printed = billing(rt, "reconcile")
    assert code == 1, printed
    report, _ = reconcile(rt, actor=None)
    found = [(c.name, d.subject, d.positions) for c in report.checks for d in c.differences]
    assert sorted(found) == sorted([
        ("read_models", "usage_totals", (usage_position[0],)),
        ("read_models", "invoices", (invoice_position[0],)),
        ("read_models", "payments", (payment_position[0],)),
    ]), found
    assert report.difference_count == 3
    for subject in ("usage_totals", "invoices", "payments"):
        assert subject in printed

    for name in ("usage_totals", "invoices", "payments"):
        code, _ = billing(rt, "projections", "rebuild", name)
        assert code == 0
    code, printed = billing(rt, "reconcile")
    assert code == 0, printed


def test_an_empty_read_model_against_a_non_empty_ledger_fails(
        live: tuple[Runtime, ThreadedWriter]) -> None:
    rt, writer = live
    tenant = calls_tenant((rt, writer))
    tenant.usage(OCTOBER, OCTOBER + timedelta(hours=1))
    report, _ = reconcile(rt, actor=None)
    assert report.ok, report
    with rt.pool.connection() as conn:
        conn.execute("DELETE FROM usage_totals")
    report, _ = reconcile(rt, actor=None, organisation_id=tenant.org.id, period="2026-10")
    assert not report.ok
    (check,) = [c for c in report.checks if c.name == "read_models"]
    assert {d.kind for d in check.differences} == {"missing"}
    caught_up(rt)  # the failed run recorded and projected: `billing status` says so
    code, printed = billing(rt, "status")
    assert code == 1 and "reconciliation: the newest" in printed and "FAILED" in printed, printed
    rebuild(rt.pool, rt.ledger, read_model("usage_totals"))
    assert reconcile(rt, actor=None)[0].ok


def test_an_invoice_its_usage_does_not_bear_out_is_a_difference(runtime: Runtime) -> None:
    # Drafted from quantities and a plan handed in: neither the usage nor the plan version is
    # in the ledger behind it.
    _, invoice = finalized(runtime)
    report, _ = reconcile(runtime, actor=None)
    (check,) = [c for c in report.checks if c.name == "invoices"]
    (difference,) = check.differences
    assert difference.key == str(invoice.id) and difference.kind == "different"
    assert difference.expected == {"plan": "no such plan version in the ledger"}
    assert difference.actual["total"] == invoice.total and difference.positions


def test_the_daily_job_reconciles_once_whichever_process_holds_the_lock(runtime: Runtime) -> None:
    key = bookkeeping.lock_key(runtime.settings.pg_schema, "reconcile")
    with psycopg.connect(runtime.database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (key,))  # another process's run
        assert reconcile_once(runtime) is None
        other.execute("SELECT pg_advisory_unlock(%s)", (key,))
    report = reconcile_once(runtime)
    assert report is not None and report.ok
    with runtime.pool.connection() as conn:
        assert not reconciliations.last_failed(conn)


@pytest.mark.parametrize("topic", [get_topic(Invoice.Finalized), get_topic(Usage.Recorded)])
def test_an_entry_the_replay_cannot_apply_is_a_recorded_failure_not_a_crash(
        runtime: Runtime, topic: str) -> None:
    # A poison entry (the projectors dead-letter it): the daily job must record a failed
    # reconciliation naming it, not crash and leave the previous verdict showing in /metrics.
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        row = conn.execute(psycopg.sql.SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state)"
            " VALUES (gen_random_uuid(), 1, %s, %s) RETURNING notification_id").format(
            psycopg.sql.Identifier(runtime.settings.pg_schema, runtime.ledger.events_table)),
            (topic, b"\xc1 not msgpack")).fetchone()
        assert row is not None
        # The usage projector dead-lettered it and moved on (the replay folds usage up to there).
        conn.execute(psycopg.sql.SQL(
            "INSERT INTO {} (name, position) VALUES ('usage_totals', %s) ON CONFLICT (name)"
            " DO UPDATE SET position = excluded.position").format(
            psycopg.sql.Identifier(runtime.settings.pg_schema, "projection_tracking")), (row[0],))
    report = reconcile_once(runtime)
    assert report is not None and not report.ok
    (check,) = [c for c in report.checks if c.name == "replay"]
    assert [d.positions for d in check.differences] == [(row[0],)]


def test_a_reconciliation_of_an_organisation_the_ledger_never_had_is_refused(
        runtime: Runtime) -> None:
    # It would compare the global tables only, report ok and record that for no organisation.
    head = runtime.ledger.head()
    with pytest.raises(NotFound):
        reconcile(runtime, actor=None, organisation_id=uuid4())
    assert runtime.ledger.head() == head  # nothing recorded


def test_a_reconciliation_while_ingestion_goes_on_reports_no_lag_as_a_difference(
        live: tuple[Runtime, ThreadedWriter]) -> None:
    rt, writer = live
    tenant = calls_tenant((rt, writer))
    stop = threading.Event()
    sent: list[int] = []

    def ingest() -> None:  # usage appended (and projected, with some lag) all through the replay
        n = 0
        while not stop.is_set():
            rows = [encode_usage(tenant.key, UsageFact(f"busy-{n}-{i}", "calls", Decimal(1),
                                                       OCTOBER + timedelta(minutes=i), {}), now())
                    for i in range(50)]
            sent.append(writer.submit(rows).result(10).position)
            n += 1

    ingestion = threading.Thread(target=ingest)
    ingestion.start()
    try:
        reports = [reconcile(rt, actor=None)[0] for _ in range(3)]
    finally:
        stop.set()
        ingestion.join()
    assert sent
    for report in reports:
        assert report.ok, [(c.name, c.compared, c.facts, c.difference_count)
                           for c in report.checks]


def test_read_models_yet_to_apply_the_ledger_lag_and_are_not_a_silent_check(
        runtime: Runtime) -> None:
    # No projector runs here: every read model is behind the invoice's entries (a lag, which
    # the replay compares up to each model's tracking position), not a check of nothing.
    finalized(runtime)
    report, _ = reconcile(runtime, actor=None)
    (check,) = [c for c in report.checks if c.name == "read_models"]
    assert check.ok and not check.silent, check


def test_a_payments_model_yet_to_apply_an_open_payment_lags_and_is_not_a_silent_check(
        runtime: Runtime) -> None:
    # An authorized (not yet captured, so not settled) payment; no projector runs here.
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    entity = PaymentEntity("pay_open", invoice.amount_due, "INR", "authorized",
                           order.razorpay_order_id, "upi", captured=False)
    payments.record_delivery(event_id="evt_open",
                             body=webhook_body("payment.authorized", payment=entity))
    payments.apply_delivery(gateway_event_ref("evt_open"))
    assert runtime.ledger.get(razorpay_payment_ref("pay_open"), Payment).settled is False
    report, _ = reconcile(runtime, actor=None)
    (check,) = [c for c in report.checks if c.name == "payments"]
    assert check.ok and not check.silent, check
