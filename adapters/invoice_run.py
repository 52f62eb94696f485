"""The invoice run: draft every subscribed organisation's invoice for a period, from usage
totals that are caught up with the ledger.

- One run at a time across processes (a Postgres advisory lock); a second caller gets 409.
- It first waits until every read model it reads has applied everything committed before the
  run started, so running while a period's events are still being projected gives the same
  totals as running after.
- An organisation that a dead-lettered ledger entry can affect is not invoiced: a usage event
  of the period or of the late-usage lookback, or any entry missing from a read model that
  pricing depends on (plans, catalogue, invoices, organisations) that names it, or that is
  platform-wide (a meter: everyone; a plan version: its subscribers). The run names it with
  each read model's missing ledger positions; after `billing dlq redrive`, a new run invoices it.
- Late usage: the invoices of the two periods before, drafts included, are what has been
  billed for them so far (docs/INVOICES.md, Late usage).
- An organisation whose period (in its timezone) has not ended plus the grace period is left
  for a later run ("not_due"). Runs are idempotent: drafted periods are "existing".
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate
from psycopg_pool import ConnectionPool

from adapters.bookkeeping import dead_letter_pages, lock_key, record_blocked, tracked_position
from adapters.gate import PgProjectionGate
from adapters.ledger import LedgerStore
from adapters.pg import TRANSIENT
from domain.errors import Conflict, DomainError, NotFound, Unavailable, ValidationFailed
from domain.invoice import Invoice
from domain.late_usage import late_usage
from domain.mail_record import InvoiceMail
from domain.meter import Meter
from domain.organisation import Organisation
from domain.plan import Plan, to_version
from domain.pricing import LateUsage, PlanVersion
from domain.records import Blocked, RunResult
from domain.services.base import Written
from domain.services.invoicing import InvoicingService
from domain.subscription import (
    check_period_has_ended_somewhere,
    parse_period,
    period_bounds,
    period_of,
    shift_period,
)
from domain.usage import Usage
from projections import catalogue, invoices, organisations, plans, usage_totals

log = logging.getLogger("billing.invoice_run")

CATCH_UP_WAIT_S = 60.0
# Usage is accepted up to 35 days late, so a run can meet new usage of the two periods before
# its own (never older): those, if already invoiced, get "late usage" lines on this invoice.
LATE_LOOKBACK_PERIODS = 2
READ_MODELS_USED = (usage_totals.NAME, plans.READ_MODEL.name, invoices.READ_MODEL.name,
                    organisations.NAME)
# Read models whose dead letters block the organisations they can affect: those the run reads,
# and the catalogue (meters, projects, keys) that pricing's inputs come from.
DEAD_LETTER_MODELS = (*READ_MODELS_USED, catalogue.READ_MODEL.name)
ZERO = Decimal(0)
# Errors that are the infrastructure's, not one organisation's: they stop the run (a later run,
# or the scheduler's next one, does the rest; drafting is idempotent).
INFRASTRUCTURE = (*TRANSIENT, Unavailable)
ENTRIES_PER_READ = 1000  # dead-lettered ledger entries decoded per read


class _Everyone:
    """Scope of an entry that can affect every organisation (a meter, an unreadable entry)."""


EVERYONE = _Everyone()
_LATE_ITEM = re.compile(r"^late\[(\d+)\]")


@dataclass
class DeadLettered:
    """What dead letters block, by scope: read model -> positions, for one organisation, for
    the subscribers of one plan code, or for every organisation."""

    by_organisation: dict[UUID, dict[str, list[int]]] = field(default_factory=dict)
    by_plan_code: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    everyone: dict[str, list[int]] = field(default_factory=dict)

    def for_organisation(self, org_id: UUID, plan_codes: Iterable[str]) -> dict[str, list[int]]:
        """Read model -> sorted positions that block `org_id` (empty: nothing does)."""
        out: dict[str, set[int]] = {}
        scopes = [self.everyone, self.by_organisation.get(org_id, {}),
                  *(self.by_plan_code.get(code, {}) for code in set(plan_codes))]
        for scope in scopes:
            for name, positions in scope.items():
                out.setdefault(name, set()).update(positions)
        return {name: sorted(positions) for name, positions in sorted(out.items())}


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
        check_period_has_ended_somewhere(period, self._clock())
        with self._exclusive("an invoice run is already in progress; try again when it ends"):
            return self._run(period, progress)

    def void(self, ident: UUID, reason: str) -> Written[Invoice]:
        """Void under the run's lock: a run reads which invoices billed late usage, then drafts;
        a void in between would leave that usage on a void invoice and on no other."""
        with self._exclusive("an invoice run is in progress; void the invoice when it ends"):
            return self._invoicing.void(ident, reason)

    @contextlib.contextmanager
    def _exclusive(self, busy: str) -> Iterator[None]:
        """One invoice run, or one void, at a time across processes (Conflict otherwise)."""
        with self._pool.connection() as lock_conn:
            got = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,)).fetchone()
            if not (got and got[0]):
                raise Conflict(busy)
            try:
                yield
            finally:
                lock_conn.execute("SELECT pg_advisory_unlock(%s)", (self._lock_key,))

    def _run(self, period: str, progress: Callable[[int, int], None] | None) -> RunResult:
        head = self._ledger.head()
        # Every model whose dead letters are checked, too: caught up to the head, each entry
        # before it is applied or recorded as a dead letter, so the check misses none.
        for name in DEAD_LETTER_MODELS:
            self._gate.wait_for(name, head, CATCH_UP_WAIT_S)
        result = RunResult(period)
        now = self._clock()
        earlier = [shift_period(period, -back) for back in range(LATE_LOOKBACK_PERIODS, 0, -1)]
        blocked = self._dead_lettered([*earlier, period])
        with self._pool.connection() as conn:
            usage_position = tracked_position(conn, usage_totals.NAME)
            # An organisation whose subscription itself is dead-lettered is missing from the
            # plans model: it is still reported (blocked), never silently left out.
            subscribed = sorted(set(plans.subscribed_organisations(conn)) | {
                org_id for org_id, models in blocked.by_organisation.items()
                if plans.READ_MODEL.name in models})
            drafted = invoices.existing_for_period(conn, period)
            month_start = date(*parse_period(period), 1)
            quantities = usage_totals.period_quantities(conn, month_start)
            # Late items for a period go on invoices of the LATE_LOOKBACK_PERIODS after it, and
            # runs can happen out of order: read every invoice from P-2 to P+1.
            billing = invoices.billing_invoices(conn, [
                shift_period(period, k) for k in range(-LATE_LOOKBACK_PERIODS, LATE_LOOKBACK_PERIODS)])
            earlier_totals = {q: usage_totals.period_quantities(conn, date(*parse_period(q), 1))
                              for q in earlier}
            versions: dict[str, list[Any]] = {}
            for done, org_id in enumerate(subscribed, 1):
                if progress:
                    progress(done, len(subscribed))
                if org_id in drafted:
                    result.existing += 1
                    continue
                try:
                    # A savepoint: an error in Postgres for one organisation must not abort
                    # the run's transaction for the others.
                    with conn.transaction():
                        status = self._invoice_one(
                            conn, org_id, period, now, blocked, versions, billing, earlier,
                            earlier_totals, quantities.get(org_id, {}), usage_position, result)
                except INFRASTRUCTURE:
                    raise  # Postgres away: the run stops, and a later run does the rest
                except Exception as e:  # one organisation's problem, of any kind, is its own
                    if isinstance(e, DomainError):
                        log.error("invoice run %s: %s not drafted: %s", period, org_id, e)
                    else:
                        log.exception("invoice run %s: %s not drafted: %s", period, org_id,
                                      type(e).__name__)
                    result.failed += 1
                    result.failed_organisations.append(org_id)
                    continue
                if status is not None:
                    setattr(result, status, getattr(result, status) + 1)
            record_blocked(conn, period, result.blocked)
        return result

    def _invoice_one(self, conn: Any, org_id: UUID, period: str, now: datetime,
                     blocked: DeadLettered, versions: dict[str, list[Any]],
                     billing: Mapping[UUID, Sequence[UUID]], earlier: list[str],
                     earlier_totals: Mapping[str, Mapping[UUID, dict[str, Decimal]]],
                     quantities: dict[str, Decimal], usage_position: int,
                     result: RunResult) -> str | None:
        """Draft one organisation's invoice; the RunResult counter to raise (None: blocked,
        recorded on `result`)."""
        org = self._ledger.get(org_id, Organisation)
        if now < period_bounds(period, org.timezone)[1] + self._grace:
            return "not_due"
        history = plans.history_entries(plans.subscription_history(conn, org_id))
        missing = blocked.for_organisation(org_id, (entry.plan_code for entry in history))
        if missing:
            positions = sorted({p for ps in missing.values() for p in ps})
            result.blocked.append(Blocked(org_id, org.name, positions, missing))
            log.error("invoice run %s: %s (%s) not invoiced: dead-lettered entries %s",
                      period, org.name, org_id, missing)
            return None
        for entry in history:
            if entry.plan_code not in versions:
                versions[entry.plan_code] = [
                    plans.stored_version(r) for r in plans.plan_versions(conn, entry.plan_code)]
        billed_by = [self._ledger.get(ident, Invoice) for ident in billing.get(org_id, [])]
        late = late_usage(
            org_id, earlier, billed_by,
            {q: earlier_totals[q].get(org_id, {}) for q in earlier},
            partial(self._plan_version, versions, conn), note=log.error)
        status = self._draft(org, period, history, versions, quantities, usage_position, late)
        if status == "skipped" and late:  # no plan covers the period, or all lines are 0
            log.error("invoice run %s: %s: nothing drafted, so late usage for %s is not "
                      "billed on it", period, org_id, [item.period for item in late])
        return status

    def _draft(self, org: Organisation, period: str, history: list[Any],
               versions: dict[str, list[Any]], quantities: dict[str, Decimal], usage_position: int,
               late: list[LateUsage]) -> str:
        try:
            _, status = self._invoicing.draft(org, period, history, versions, quantities,
                                              usage_position, self._supplier, late)
        except ValidationFailed as e:
            refused = {int(m.group(1)) for err in e.errors if (m := _LATE_ITEM.match(err.field))}
            if not refused or any(not _LATE_ITEM.match(err.field) for err in e.errors):
                raise
            # Pricing refused some late items (e.g. another currency): leave out those alone;
            # the rest of the late usage is still billed. What was left out stays unbilled
            # (the chain did not move), so a later run sees it again.
            log.error("invoice run %s: %s: late usage left out, needs a credit note or a manual "
                      "correction: %s", period, org.id, e)
            kept = [item for index, item in enumerate(late) if index not in refused]
            _, status = self._invoicing.draft(org, period, history, versions, quantities,
                                              usage_position, self._supplier, kept)
        return status

    @staticmethod
    def _plan_version(versions: dict[str, list[Any]], conn: Any, code: str, version: int) -> PlanVersion:
        if code not in versions:
            versions[code] = [plans.stored_version(r) for r in plans.plan_versions(conn, code)]
        for stored in versions[code]:
            if stored.version == version:
                return to_version(stored)
        raise NotFound("plan version", f"{code} v{version}")

    def _dead_lettered(self, usage_periods: list[str]) -> DeadLettered:
        """What every dead letter of DEAD_LETTER_MODELS blocks (all of them, page by page).
        A usage event blocks its organisation if it falls in one of `usage_periods` (the run's
        period and the late-usage lookback); any other entry blocks the organisation it names,
        the subscribers of a plan version's code, or everyone (a meter; an entry that cannot
        be read or attributed)."""
        out = DeadLettered()
        with self._pool.connection() as conn:
            for page in dead_letter_pages(conn, DEAD_LETTER_MODELS):
                events = self._entries(sorted({int(row["position"]) for row in page}))
                for row in page:
                    name, position = str(row["name"]), int(row["position"])
                    event = events.get(position)
                    scope = EVERYONE if event is None else self._scope(event, usage_periods)
                    if scope is None:
                        continue
                    if isinstance(scope, UUID):
                        target = out.by_organisation.setdefault(scope, {})
                    elif isinstance(scope, str):
                        target = out.by_plan_code.setdefault(scope, {})
                    else:
                        target = out.everyone
                    target.setdefault(name, []).append(position)
        return out

    def _entries(self, positions: list[int]) -> dict[int, Any]:
        """The decoded ledger entries at `positions` (sorted): one read per run of consecutive
        positions. A position that cannot be read or decoded is absent."""
        out: dict[int, Any] = {}
        index = 0
        while index < len(positions):
            first = last = positions[index]
            while (index + 1 < len(positions) and positions[index + 1] == last + 1
                   and last - first + 1 < ENTRIES_PER_READ):
                index += 1
                last = positions[index]
            index += 1
            for n in self._ledger.read_after(first - 1, last - first + 1, stop=last):
                try:
                    out[int(n.id)] = self._ledger.decode(n)
                except Exception:  # an entry that will not decode is attributed to everyone
                    log.exception("dead letter at %s cannot be decoded", n.id)
        return out

    def _scope(self, event: Any, usage_periods: list[str]) -> UUID | str | _Everyone | None:
        """Whom a dead-lettered entry can affect: an organisation id, a plan code (its
        subscribers), EVERYONE, or None (a usage event outside the periods this run bills)."""
        if isinstance(event, Usage.Recorded):
            inside = period_of(event.occurred_at, event.timezone) in usage_periods
            return event.organisation_id if inside else None
        organisation_id = getattr(event, "organisation_id", None)
        if isinstance(organisation_id, UUID):
            return organisation_id
        if isinstance(event, (Plan.Published, Plan.VersionPublished)):
            return str(event.code)
        if isinstance(event, (Meter.Defined, Meter.Redefined)):
            return EVERYONE
        try:
            if isinstance(event, InvoiceMail.Sent):
                return self._ledger.get(event.invoice_id, Invoice).organisation_id
            aggregate = self._ledger.get(event.originator_id, Aggregate)
        except DomainError:
            return EVERYONE
        if isinstance(aggregate, Organisation):
            return aggregate.id
        organisation_id = getattr(aggregate, "organisation_id", None)
        return organisation_id if isinstance(organisation_id, UUID) else EVERYONE
