"""The invoice run: draft every subscribed organisation's invoice for a period, from usage
totals that are caught up with the ledger.

- One run at a time across processes (a Postgres advisory lock); a second caller gets 409.
- It first waits until every read model it reads has applied everything committed before the
  run started, so running while a period's events are still being projected gives the same
  totals as running after.
- An organisation with dead-lettered usage events in the period is not invoiced: the run names
  it with the missing ledger positions; after `billing dlq redrive`, a new run invoices it.
- An organisation whose period (in its timezone) has not ended plus the grace period is left
  for a later run ("not_due"). Runs are idempotent: drafted periods are "existing".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool

from adapters.bookkeeping import dead_letters, lock_key, tracked_position
from adapters.gate import PgProjectionGate
from adapters.ledger import LedgerStore
from domain.errors import Conflict, DomainError, ValidationFailed
from domain.invoice import Invoice
from domain.invoicing import InvoicingService
from domain.organisation import Organisation
from domain.plan import to_version
from domain.ports import Blocked, RunResult
from domain.pricing import LateUsage
from domain.subscription import parse_period, period_bounds
from domain.usage import Usage
from projections import invoices, organisations, plans, usage_totals

log = logging.getLogger("billing.invoice_run")

CATCH_UP_WAIT_S = 60.0
# Usage is accepted up to 35 days late, so a run can meet new usage of the two periods before
# its own (never older): those, if already invoiced, get "late usage" lines on this invoice.
LATE_LOOKBACK_PERIODS = 2
READ_MODELS_USED = (usage_totals.NAME, plans.READ_MODEL.name, invoices.READ_MODEL.name,
                    organisations.NAME)


class InvoiceRun:
    def __init__(self, pool: ConnectionPool, ledger: LedgerStore, invoicing: InvoicingService,
                 supplier_state_code: str, clock: Callable[[], datetime], grace: timedelta,
                 schema: str) -> None:
        self._pool = pool
        self._ledger = ledger
        self._gate = PgProjectionGate(pool, ledger)
        self._invoicing = invoicing
        self._supplier = supplier_state_code
        self._clock = clock
        self._grace = grace
        self._lock_key = lock_key(schema, "invoice-run")

    def run(self, period: str, progress: Callable[[int, int], None] | None = None) -> RunResult:
        parse_period(period)
        with self._pool.connection() as lock_conn:
            got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,)).fetchone()
            if not (got and got[0]):
                raise Conflict("an invoice run is already in progress; try again when it ends")
            try:
                return self._run(period, progress)
            finally:
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", (self._lock_key,))

    def _run(self, period: str, progress: Callable[[int, int], None] | None) -> RunResult:
        head = self._ledger.head()
        for name in READ_MODELS_USED:
            self._gate.wait_for(name, head, CATCH_UP_WAIT_S)
        result = RunResult(period)
        now = self._clock()
        blocked = self._dead_lettered(period)
        with self._pool.connection() as conn:
            usage_position = tracked_position(conn, usage_totals.NAME)
            subscribed = plans.subscribed_organisations(conn)
            drafted = invoices.existing_for_period(conn, period)
            month_start = date(*parse_period(period), 1)
            quantities = usage_totals.period_quantities(conn, month_start)
            earlier = [shift_period(period, -back) for back in range(LATE_LOOKBACK_PERIODS, 0, -1)]
            billed = invoices.billed_invoices(conn, earlier)
            earlier_totals = {q: usage_totals.period_quantities(conn, date(*parse_period(q), 1))
                              for q in earlier}
            versions: dict[str, list[Any]] = {}
            for done, org_id in enumerate(subscribed, 1):
                if progress:
                    progress(done, len(subscribed))
                if org_id in drafted:
                    result.existing += 1
                    continue
                org = self._ledger.get(org_id, Organisation)
                if now < period_bounds(period, org.timezone)[1] + self._grace:
                    result.not_due += 1
                    continue
                if org_id in blocked:
                    result.blocked.append(Blocked(org_id, org.name, blocked[org_id]))
                    continue
                history = plans.history_entries(plans.subscription_history(conn, org_id))
                for entry in history:
                    if entry.plan_code not in versions:
                        versions[entry.plan_code] = [
                            plans.stored_version(r) for r in plans.plan_versions(conn, entry.plan_code)]
                late = self._late_usage(org_id, earlier, billed, earlier_totals, versions, conn)
                try:
                    status = self._draft(org, period, history, versions,
                                         quantities.get(org_id, {}), usage_position, late)
                except DomainError as e:  # one organisation's problem never stops the run
                    log.error("invoice run %s: %s not drafted: %s", period, org_id, e)
                    result.failed += 1
                    continue
                setattr(result, status, getattr(result, status) + 1)
        return result

    def _draft(self, org: Organisation, period: str, history: list[Any],
               versions: dict[str, list[Any]], quantities: dict[str, Decimal], usage_position: int,
               late: list[LateUsage]) -> str:
        try:
            _, status = self._invoicing.draft(org, period, history, versions, quantities,
                                              usage_position, self._supplier, late)
        except ValidationFailed as e:
            if not late or not any(err.field.startswith("late") for err in e.errors):
                raise
            # Less usage than was billed: that needs a credit note, not a negative line.
            log.error("invoice run %s: %s has late usage below what was billed (%s); drafting "
                      "without it — issue a credit note", period, org.id, e)
            _, status = self._invoicing.draft(org, period, history, versions, quantities,
                                              usage_position, self._supplier)
        return status

    def _late_usage(self, org_id: UUID, earlier: list[str],
                    billed: dict[tuple[UUID, str], UUID],
                    totals: dict[str, dict[UUID, dict[str, Decimal]]],
                    versions: dict[str, list[Any]], conn: Any) -> list[LateUsage]:
        """Usage that reached already-invoiced earlier periods since they were billed: what
        their invoice (and any later invoice's late lines) billed, against the totals now."""
        late: list[LateUsage] = []
        for q in earlier:
            invoice_id = billed.get((org_id, q))
            if invoice_id is None:
                continue
            invoice = self._ledger.get(invoice_id, Invoice)
            so_far = dict(invoice.quantities)
            for later in earlier[earlier.index(q) + 1:]:
                later_id = billed.get((org_id, later))
                if later_id is not None:
                    for item in self._ledger.get(later_id, Invoice).late_usage:
                        if item.period == q:
                            so_far = dict(item.corrected)
            now = {m: totals[q].get(org_id, {}).get(m, Decimal(0)) for m in so_far}
            if now == so_far:
                continue
            if invoice.plan_code not in versions:
                versions[invoice.plan_code] = [
                    plans.stored_version(r) for r in plans.plan_versions(conn, invoice.plan_code)]
            stored = next(v for v in versions[invoice.plan_code] if v.version == invoice.plan_version)
            late.append(LateUsage(q, to_version(stored), so_far, now))
        return late

    def _dead_lettered(self, period: str) -> dict[UUID, list[int]]:
        """Organisations whose usage in `period` has dead-lettered ledger entries."""
        with self._pool.connection() as conn:
            letters = dead_letters(conn, usage_totals.NAME)
        out: dict[UUID, list[int]] = {}
        for letter in letters:
            position = int(letter["position"])
            for n in self._ledger.read_after(position - 1, 1, stop=position):
                event = self._ledger.decode(n)
                if isinstance(event, Usage.Recorded):
                    start, end = period_bounds(period, event.timezone)
                    if start <= event.occurred_at < end:
                        out.setdefault(event.organisation_id, []).append(position)
        return out


def shift_period(period: str, months: int) -> str:
    year, month = parse_period(period)
    index = year * 12 + (month - 1) + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def due_periods(now: datetime, grace: timedelta, count: int) -> list[str]:
    """The last `count` calendar months that ended at least `grace` ago (UTC calendar; the run
    checks each organisation's own timezone)."""
    periods: list[str] = []
    at = now - grace
    year, month = at.year, at.month
    for _ in range(count):
        month -= 1
        if month == 0:
            year, month = year - 1, 12
        periods.append(f"{year:04d}-{month:02d}")
    return periods


