"""Scheduled work (APScheduler): the monthly invoice run, automatic finalization of drafts,
invoice and payment emails, and the recovery of payments whose webhooks were missed. Every job
is safe to run in several processes: the invoice run takes a Postgres advisory lock,
finalization and emails are idempotent by construction, and recovery records deliveries under
derived ids (a second check records nothing new)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from domain.errors import Conflict, DomainError
from domain.numbering import InvoiceSequence
from domain.period import due_periods
from infra.wiring import Runtime
from projections import invoices, payments

log = logging.getLogger("billing.scheduler")

INVOICE_RUN_EVERY_MIN = 15
FINALIZE_EVERY_MIN = 15
CATCH_UP_PERIODS = 2  # after downtime, the last two ended periods are run again (idempotent)
FINALIZE_BATCH_MAX = 1000
FINALIZE_APPEND_MAX = 500  # drafts numbered per ledger append
EMAIL_EVERY_MIN = 1
RECOVERY_EVERY_MIN = 1
RECOVERY_BATCH_MAX = 100  # orders checked per pass; the rest wait for the next minute


async def invoice_job(rt: Runtime) -> None:
    """Run every catch-up period. A period that fails, for any reason, is logged and the next
    one still runs: one bad period must never stop the others, nor the scheduler."""
    now = datetime.now(UTC)
    run = rt.invoice_run()
    for period in due_periods(now, timedelta(hours=rt.settings.grace_hours), CATCH_UP_PERIODS):
        try:
            result = await asyncio.to_thread(run.run, period, actor=None)
        except Conflict as e:
            log.info("invoice run %s skipped: %s", period, e)
            continue
        except DomainError as e:
            log.error("invoice run %s failed: %s", period, e)
            continue
        except Exception:
            log.exception("invoice run %s failed", period)
            continue
        # Under one key of our own: LogRecord refuses extras named like its attributes
        # ("created" is one), and raised KeyError here on every run.
        log.info("invoice run", extra={"invoice_run": {
            "period": period, "run_id": str(result.run_id), "created": result.created,
            "existing": result.existing,
            "skipped": result.skipped, "not_due": result.not_due, "failed": result.failed,
            "blocked": [str(b.organisation_id) for b in result.blocked],
            "failed_organisations": [str(o) for o in result.failed_organisations],
            "organisations": [{"organisation_id": str(e.organisation_id), "name": e.name,
                               "outcome": e.outcome, "reason": e.reason}
                              for e in result.entries],
            "more": result.more}})
        for b in result.blocked:
            log.error("invoice run %s: %s (%s) not invoiced, dead-lettered entries %s",
                      period, b.name, b.organisation_id, b.read_models)


def finalize_due(rt: Runtime, now: datetime) -> int:
    """Finalize drafts older than the configured delay; returns how many were finalized."""
    hours = rt.settings.auto_finalize_hours
    if hours <= 0:
        return 0
    with rt.pool.connection() as conn:
        drafts = invoices.page(conn, FINALIZE_BATCH_MAX, None, status="draft")
    service = rt.invoicing()
    due = [row.id for row in drafts if row.created_at <= now - timedelta(hours=hours)]
    done = 0
    sequences: dict[int, InvoiceSequence] = {}  # the year's sequence, kept across batches
    # Numbered in batches, each one ledger append with the year's sequence (issue 19).
    for start in range(0, len(due), FINALIZE_APPEND_MAX):
        batch = due[start:start + FINALIZE_APPEND_MAX]
        try:
            done += len(service.finalize_batch(batch, actor=None, sequences=sequences))
        except DomainError as e:
            log.warning("auto-finalize of %d drafts from %s: %s", len(batch), batch[0], e)
    return done


def recover_payments(rt: Runtime, now: datetime) -> int:
    """One pass of missed-webhook recovery (docs/PAYMENTS.md): ask Razorpay for the payments of
    each open order due for a check; returns how many new deliveries were recorded. One order's
    failure is logged and the others still run."""
    service = rt.payments()
    if not service.configured:
        return 0
    with rt.pool.connection() as conn:
        due = payments.orders_to_check(conn, now, RECOVERY_BATCH_MAX)
    found = 0
    for order in due:
        try:
            found += service.recover(order.id, now)
        except DomainError as e:
            log.warning("payment recovery of order %s: %s", order.razorpay_order_id, e)
    return found


def start(rt: Runtime) -> AsyncIOScheduler:
    """Schedule every job on the running event loop (the first runs soon after start, so a
    restarted process catches up) and start the scheduler; the caller shuts it down."""
    scheduler = AsyncIOScheduler(timezone="UTC")
    now = datetime.now(UTC)
    # next_run_time=now: a restarted scheduler catches up at once on runs it missed.
    scheduler.add_job(invoice_job, "interval", args=[rt], minutes=INVOICE_RUN_EVERY_MIN,
                      next_run_time=now, max_instances=1, coalesce=True, id="invoice-run")

    async def finalize_job() -> None:
        count = await asyncio.to_thread(finalize_due, rt, datetime.now(UTC))
        if count:
            log.info("auto-finalized %d draft invoices", count)

    scheduler.add_job(finalize_job, "interval", minutes=FINALIZE_EVERY_MIN,
                      next_run_time=now + timedelta(seconds=30), max_instances=1, coalesce=True,
                      id="finalize")
    notifier = rt.notifier()

    async def email_job() -> None:
        sent, failed = await asyncio.to_thread(notifier.send_due)
        if sent or failed:
            log.info("invoice emails", extra={"invoice_emails": {"sent": sent, "failed": failed}})

    scheduler.add_job(email_job, "interval", minutes=EMAIL_EVERY_MIN,
                      next_run_time=now + timedelta(seconds=10), max_instances=1, coalesce=True,
                      id="email")

    async def recovery_job() -> None:
        found = await asyncio.to_thread(recover_payments, rt, datetime.now(UTC))
        if found:
            log.info("payment recovery recorded %d deliveries a webhook had not brought", found)

    scheduler.add_job(recovery_job, "interval", minutes=RECOVERY_EVERY_MIN,
                      next_run_time=now + timedelta(seconds=20), max_instances=1, coalesce=True,
                      id="payment-recovery")
    scheduler.start()
    return scheduler
