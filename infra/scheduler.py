"""Scheduled work (APScheduler): the monthly invoice run, automatic finalization of drafts,
invoice and payment emails, credit note emails, the refunds of credit notes never asked of
Razorpay, and the recovery of payments whose webhooks were missed. Every job
is safe to run in several processes: the invoice run takes a Postgres advisory lock,
finalization and emails are idempotent by construction, and recovery records deliveries under
derived ids (a second check records nothing new)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_SUBMITTED,
    EVENT_SCHEDULER_SHUTDOWN,
    JobEvent,
    SchedulerEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from adapters import schedule
from adapters.invoice_archive import archive_credit_notes, archive_finalized
from domain.errors import Conflict, DomainError
from domain.numbering import InvoiceSequence
from domain.period import due_periods
from domain.services.credit_notes import CreditNotesService
from infra.ledger_cli import store_of
from infra.reconcile import RECONCILE_DAILY_AT_UTC, reconciliation_job
from infra.wiring import Runtime
from projections import credit_notes as credit_notes_view
from projections import invoices, payments

log = logging.getLogger("billing.scheduler")

INVOICE_RUN_EVERY_MIN = 15
FINALIZE_EVERY_MIN = 15
CATCH_UP_PERIODS = 2  # after downtime, the last two ended periods are run again (idempotent)
FINALIZE_BATCH_MAX = 1000
FINALIZE_APPEND_MAX = 500  # drafts numbered per ledger append
EMAIL_EVERY_MIN = 1
RECOVERY_EVERY_MIN = 1
REFUND_EVERY_MIN = 1  # credit note refunds never asked of Razorpay (a crash after issuing)
REFUND_REQUEST_GRACE = timedelta(minutes=2)  # the issuing request asks within this
REFUND_BATCH_MAX = 100  # notes per pass
RECOVERY_BATCH_MAX = 100  # orders checked per pass; the rest wait for the next minute
INVOICE_RUN_JOB = "invoice-run"  # the invoice run's job id, as start() schedules it
SCHEDULE_RECORD_TIMEOUT_S = 2.0  # at shutdown, the wait for a connection to record it
ARCHIVE_EVERY_MIN = 5


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


def request_pending_refunds(rt: Runtime, now: datetime,
                            service: CreditNotesService | None = None) -> int:
    """One pass over refund credit notes with a share never asked of Razorpay (the process
    stopped between issuing a note and asking; docs/CREDIT_NOTES.md): ask now, under the
    share's own X-Refund-Idempotency key. Notes younger than REFUND_REQUEST_GRACE are left to
    the request that issued them. Failed refunds are not retried here: a person decides
    (POST .../retry-refund). Returns how many notes were asked for."""
    service = service or rt.credit_notes()
    with rt.pool.connection() as conn:
        due = credit_notes_view.unrequested(conn, now - REFUND_REQUEST_GRACE, REFUND_BATCH_MAX)
    asked = 0
    for ident in due:
        try:
            service.request_refunds(ident)
            asked += 1
        except DomainError as e:
            log.warning("refunds of credit note %s not requested: %s", ident, e)
    return asked


def _every(scheduler: AsyncIOScheduler, job: Callable[[], Awaitable[None]], *, minutes: int,
           first: datetime, job_id: str) -> None:
    """An interval job, at most one instance at a time, missed runs coalesced into one."""
    scheduler.add_job(job, "interval", minutes=minutes, next_run_time=first, max_instances=1,
                      coalesce=True, id=job_id)


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

    _every(scheduler, finalize_job, minutes=FINALIZE_EVERY_MIN, first=now + timedelta(seconds=30),
           job_id="finalize")
    notifier = rt.notifier()

    async def email_job() -> None:
        sent, failed = await asyncio.to_thread(notifier.send_due)
        if sent or failed:
            log.info("invoice emails", extra={"invoice_emails": {"sent": sent, "failed": failed}})

    _every(scheduler, email_job, minutes=EMAIL_EVERY_MIN, first=now + timedelta(seconds=10),
           job_id="email")

    credit_note_notifier = rt.credit_note_notifier()

    async def credit_note_email_job() -> None:
        sent, failed = await asyncio.to_thread(credit_note_notifier.send_due)
        if sent or failed:
            log.info("credit note emails", extra={"credit_note_emails": {"sent": sent,
                                                                         "failed": failed}})

    _every(scheduler, credit_note_email_job, minutes=EMAIL_EVERY_MIN, first=now + timedelta(seconds=15),
           job_id="credit-note-email")

    async def refund_job() -> None:
        asked = await asyncio.to_thread(request_pending_refunds, rt, datetime.now(UTC))
        if asked:
            log.info("asked Razorpay for the refunds of %d credit notes", asked)

    _every(scheduler, refund_job, minutes=REFUND_EVERY_MIN, first=now + timedelta(seconds=25),
           job_id="credit-note-refunds")

    async def recovery_job() -> None:
        found = await asyncio.to_thread(recover_payments, rt, datetime.now(UTC))
        if found:
            log.info("payment recovery recorded %d deliveries a webhook had not brought", found)

    _every(scheduler, recovery_job, minutes=RECOVERY_EVERY_MIN, first=now + timedelta(seconds=20),
           job_id="payment-recovery")
    record_invoice_schedule(rt, scheduler)
    store = store_of(rt.settings)

    async def archive_job() -> None:  # finalized invoices' PDFs to the archive (docs/AUDIT.md)
        archived = await asyncio.to_thread(archive_finalized, rt.pool, rt.supplier(), store)
        notes = await asyncio.to_thread(archive_credit_notes, rt.pool, rt.supplier(), store)
        if archived or notes:
            log.info("archived %d finalized invoice and %d credit note PDFs to %s", archived,
                     notes, store.describe())

    _every(scheduler, archive_job, minutes=ARCHIVE_EVERY_MIN, first=now + timedelta(seconds=40),
           job_id="archive")
    hour, minute = RECONCILE_DAILY_AT_UTC
    scheduler.add_job(reconciliation_job, "cron", args=[rt], hour=hour, minute=minute,
                      max_instances=1, coalesce=True, id="reconciliation")
    scheduler.start()
    return scheduler


def record_invoice_schedule(rt: Runtime, scheduler: AsyncIOScheduler) -> None:
    """Keep the invoice run's record (adapters/schedule.py) as the scheduler runs it: its next
    run time whenever a run is submitted (or refused while one still runs), when each run
    started and finished, and no next run once the scheduler shuts down (`serve` stopping).
    Written from a worker thread, so the event loop never waits on Postgres; only the last
    record, at shutdown, is written at once (bounded), before the process goes."""
    pending: set[asyncio.Future[None]] = set()

    def on_event(event: SchedulerEvent) -> None:
        now = datetime.now(UTC)
        if event.code == EVENT_SCHEDULER_SHUTDOWN:
            _record_invoice_job(rt, None, now, None, None, stopped=True)
            return
        if not isinstance(event, JobEvent) or event.job_id != INVOICE_RUN_JOB:
            return
        started = now if event.code == EVENT_JOB_SUBMITTED else None
        finished = now if event.code in (EVENT_JOB_EXECUTED, EVENT_JOB_ERROR) else None
        write = partial(_record_invoice_job, rt, scheduler, now, started, finished)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop (a thread executor's callback): write here
            write()
            return
        task = asyncio.ensure_future(loop.run_in_executor(None, write))
        pending.add(task)
        task.add_done_callback(pending.discard)

    scheduler.add_listener(on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MAX_INSTANCES
                           | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_SCHEDULER_SHUTDOWN)


def _record_invoice_job(rt: Runtime, scheduler: AsyncIOScheduler | None, now: datetime,
                        started: datetime | None, finished: datetime | None, *,
                        stopped: bool = False) -> None:
    job = scheduler.get_job(INVOICE_RUN_JOB) if scheduler is not None else None
    try:
        with rt.pool.connection(timeout=SCHEDULE_RECORD_TIMEOUT_S if stopped else None) as conn:
            schedule.record(conn, INVOICE_RUN_JOB, next_run_at=job.next_run_time if job else None,
                            now=now, started_at=started, finished_at=finished)
    except Exception as e:  # a record for `billing status`: never a reason to stop the scheduler
        log.warning("could not record the invoice run's schedule: %s", e)
