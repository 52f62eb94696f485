"""The invoice run: draft every subscribed organisation's invoice for a period, from usage
totals that are caught up with the ledger. This module reads (Postgres, the ledger), locks,
keeps each organisation in its own savepoint and logs; what to do with what it read is decided
by the pure functions of domain/services/invoice_runs.py.

- One run at a time across processes (a Postgres advisory lock); a second caller gets 409.
- It first waits until every read model it reads has applied everything committed before the
  run started, so running while a period's events are still being projected gives the same
  totals as running after.
- An organisation that a dead-lettered ledger entry can affect is not invoiced: a usage event
  of the period or of the late-usage lookback, or any entry missing from a read model that
  pricing depends on (plans, catalogue, invoices, organisations) that names it, or that is
  platform-wide (a meter: everyone; a plan version: its subscribers). The run names it with
  each read model's missing ledger positions; after `billing dlq redrive`, a new run invoices it.
- Invoice lines are described by the meter's name from the catalogue (recorded on the draft).
- Late usage: the invoices of the two periods before, drafts included, are what has been
  billed for them so far (docs/INVOICES.md, Late usage).
- An organisation whose period (in its timezone) has not ended plus the grace period is left
  for a later run ("not_due"). Runs are idempotent: drafted periods are "existing".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any
from uuid import UUID

from psycopg_pool import ConnectionPool

from adapters.bookkeeping import dead_letter_pages, lock_key, record_blocked, tracked_position
from adapters.gate import PgProjectionGate
from adapters.ledger import LedgerStore
from adapters.pg import TRANSIENT
from domain.audit import Actor
from domain.errors import Conflict, DomainError, NotFound, Unavailable, ValidationFailed
from domain.invoice import Invoice
from domain.late_usage import late_usage
from domain.organisation import Organisation
from domain.period import check_period_has_ended_somewhere, first_day
from domain.plan import StoredVersion, to_version
from domain.pricing import LateUsage, PlanVersion
from domain.records import RunResult
from domain.services import invoice_runs as decide
from domain.services.base import Written
from domain.services.invoice_runs import DeadLettered, Done, Outcome, OwnerOf, Scope
from domain.services.invoicing import InvoicingService
from domain.subscription import SubscriptionEntry
from projections import catalogue, invoices, organisations, plans, usage_totals

log = logging.getLogger("billing.invoice_run")

CATCH_UP_WAIT_S = 60.0
READ_MODELS_USED = (usage_totals.NAME, plans.READ_MODEL.name, invoices.READ_MODEL.name,
                    organisations.NAME)
# Read models whose dead letters block the organisations they can affect: those the run reads,
# and the catalogue (meters, projects, keys) that pricing's inputs come from.
DEAD_LETTER_MODELS = (*READ_MODELS_USED, catalogue.READ_MODEL.name)
# Errors that are the infrastructure's, not one organisation's: they stop the run (a later run,
# or the scheduler's next one, does the rest; drafting is idempotent).
INFRASTRUCTURE = (*TRANSIENT, Unavailable)
ENTRIES_PER_READ = 1000  # dead-lettered ledger entries decoded per read


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

    def run(self, period: str, progress: Callable[[int, int], None] | None = None, *,
            actor: Actor | None) -> RunResult:
        """Run `period`; the drafts are saved on behalf of `actor` (None: the scheduler)."""
        check_period_has_ended_somewhere(period, self._clock())
        with self._exclusive("an invoice run is already in progress; try again when it ends"):
            return self._run(period, progress, actor)

    def void(self, ident: UUID, reason: str, *, actor: Actor | None) -> Written[Invoice]:
        """Void under the run's lock: a run reads which invoices billed late usage, then drafts;
        a void in between would leave that usage on a void invoice and on no other."""
        with self._exclusive("an invoice run is in progress; void the invoice when it ends"):
            return self._invoicing.void(ident, reason, actor=actor)

    def redraft(self, ident: UUID, *, actor: Actor | None) -> Written[Invoice]:
        """A replacement for the voided invoice `ident` (adapters/redraft.py), under the run's
        lock: a run and a redraft never draft one period at once (Conflict while a run runs)."""
        from adapters.redraft import redraft_voided  # it reads with this module's helpers

        with self._exclusive("an invoice run is in progress; redraft the invoice when it ends"):
            return redraft_voided(
                ident, pool=self._pool, ledger=self._ledger, gate=self._gate,
                invoicing=self._invoicing, supplier_state_code=self._supplier,
                read_models=DEAD_LETTER_MODELS, dead_lettered=self._dead_lettered, actor=actor)

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

    def _run(self, period: str, progress: Callable[[int, int], None] | None,
             actor: Actor | None) -> RunResult:
        head = self._ledger.head()
        # Every model whose dead letters are checked, too: caught up to the head, each entry
        # before it is applied or recorded as a dead letter, so the check misses none.
        for name in DEAD_LETTER_MODELS:
            self._gate.wait_for(name, head, CATCH_UP_WAIT_S)
        now = self._clock()
        earlier = decide.lookback_periods(period)
        dead = self._dead_lettered(decide.usage_periods(period))
        done: list[Done] = []
        with self._pool.connection() as conn:
            usage_position = tracked_position(conn, usage_totals.NAME)
            subscribed = decide.organisations_to_run(
                plans.subscribed_organisations(conn), dead, plans.READ_MODEL.name)
            drafted = invoices.existing_for_period(conn, period)
            quantities = usage_totals.period_quantities(conn, first_day(period))
            billing = invoices.billing_invoices(conn, decide.billing_periods(period))
            earlier_totals = {q: usage_totals.period_quantities(conn, first_day(q)) for q in earlier}
            versions: dict[str, list[StoredVersion]] = {}
            meter_names = _meter_names(conn)
            names: dict[UUID, str] = {}  # each organisation's, once read: a failure names it
            for count, org_id in enumerate(subscribed, 1):
                if progress:
                    progress(count, len(subscribed))
                if org_id in drafted:
                    done.append(Done(org_id, "existing"))
                    continue
                try:
                    # A savepoint: an error in Postgres for one organisation must not abort
                    # the run's transaction for the others.
                    with conn.transaction():
                        done.append(self._invoice_one(
                            conn, org_id, period, now, dead, versions, billing, earlier,
                            decide.lookback_totals(org_id, earlier_totals),
                            quantities.get(org_id, {}), usage_position, meter_names, names,
                            actor))
                except INFRASTRUCTURE:
                    raise  # Postgres away: the run stops, and a later run does the rest
                except Exception as e:  # one organisation's problem, of any kind, is its own
                    if isinstance(e, DomainError):
                        log.error("invoice run %s: %s not drafted: %s", period, org_id, e)
                    else:
                        log.exception("invoice run %s: %s not drafted: %s", period, org_id,
                                      type(e).__name__)
                    done.append(Done(org_id, "failed", name=names.get(org_id, ""),
                                     reason=decide.failed_reason(e)))
            result = decide.tally(period, done)
            record_blocked(conn, period, result.blocked)
        return result

    def _invoice_one(self, conn: Any, org_id: UUID, period: str, now: datetime,
                     dead: DeadLettered, versions: dict[str, list[StoredVersion]],
                     billing: Mapping[UUID, Sequence[UUID]], earlier: list[str],
                     totals: Mapping[str, Mapping[str, Decimal]],
                     quantities: dict[str, Decimal], usage_position: int,
                     meter_names: Mapping[str, str], names: dict[UUID, str],
                     actor: Actor | None) -> Done:
        """Draft one organisation's invoice, or say why not."""
        org = self._ledger.get(org_id, Organisation)
        names[org_id] = org.name
        if not decide.is_due(period, org.timezone, now, self._grace):
            return Done(org_id, "not_due", name=org.name,
                        reason=decide.not_due_reason(period, org.timezone, self._grace))
        history = plans.history_entries(plans.subscription_history(conn, org_id))
        stuck = decide.blocked(org_id, org.name, dead, (entry.plan_code for entry in history))
        if stuck is not None:
            log.error("invoice run %s: %s (%s) not invoiced: dead-lettered entries %s",
                      period, org.name, org_id, stuck.read_models)
            return Done(org_id, "blocked", stuck, name=org.name,
                        reason=decide.blocked_reason(stuck))
        for entry in history:
            if entry.plan_code not in versions:
                versions[entry.plan_code] = _stored_versions(conn, entry.plan_code)
        billed_by = [self._ledger.get(ident, Invoice) for ident in billing.get(org_id, [])]
        late = late_usage(org_id, earlier, billed_by, totals,
                          partial(_plan_version, versions, conn), note=log.error)
        status, why = self._draft(org, period, history, versions, quantities, usage_position,
                                  late, meter_names, actor)
        if status == "skipped" and late:  # no plan covers the period, or all lines are 0
            log.error("invoice run %s: %s: nothing drafted, so late usage for %s is not "
                      "billed on it", period, org_id, [item.period for item in late])
        return Done(org_id, status, name=org.name, reason=why)

    def _draft(self, org: Organisation, period: str, history: list[SubscriptionEntry],
               versions: dict[str, list[StoredVersion]], quantities: dict[str, Decimal],
               usage_position: int, late: list[LateUsage], meter_names: Mapping[str, str],
               actor: Actor | None) -> tuple[Outcome, str]:
        """The draft's status, and why when it was skipped."""
        try:
            _, status, why = self._invoicing.draft(
                org, period=period, subscription_history=history, plan_versions=versions,
                quantities=quantities, usage_position=usage_position,
                supplier_state_code=self._supplier, late=late, meter_names=meter_names,
                actor=actor)
        except ValidationFailed as e:
            kept = decide.late_items_to_keep(late, e)
            if kept is None:
                raise
            log.error("invoice run %s: %s: late usage left out, needs a credit note or a manual "
                      "correction: %s", period, org.id, e)
            _, status, why = self._invoicing.draft(
                org, period=period, subscription_history=history, plan_versions=versions,
                quantities=quantities, usage_position=usage_position,
                supplier_state_code=self._supplier, late=kept, meter_names=meter_names,
                actor=actor)
        return status, why

    def _dead_lettered(self, usage_periods: list[str]) -> DeadLettered:
        """What every dead letter of DEAD_LETTER_MODELS blocks (all of them, page by page)."""
        entries: list[tuple[str, int, Scope]] = []
        with self._pool.connection() as conn:
            for page in dead_letter_pages(conn, DEAD_LETTER_MODELS):
                events = self._entries(sorted({int(row["position"]) for row in page}))
                for row in page:
                    position = int(row["position"])
                    event = events.get(position)
                    scope = decide.EVERYONE if event is None else self._scope(event, usage_periods)
                    entries.append((str(row["name"]), position, scope))
        return decide.dead_lettered(entries)

    def _scope(self, event: Any, usage_periods: list[str]) -> Scope:
        """Whom a dead-lettered entry can affect, reading its aggregate when it names nobody."""
        scope = decide.scope_of(event, usage_periods)
        if not isinstance(scope, OwnerOf):
            return scope
        try:
            owner = self._ledger.get(scope.aggregate_id, scope.kind)
        except DomainError:
            return decide.scope_of_owner(None)
        return decide.scope_of_owner(owner)

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


def _meter_names(conn: Any) -> dict[str, str]:
    """Meter code -> name from the catalogue, every meter (the catalogue's listing is capped):
    invoice lines are described by the name a customer knows."""
    return {str(code): str(name) for code, name in conn.execute("SELECT code, name FROM meters")}


def _stored_versions(conn: Any, code: str) -> list[StoredVersion]:
    return [plans.stored_version(r) for r in plans.plan_versions(conn, code)]


def _plan_version(versions: dict[str, list[StoredVersion]], conn: Any, code: str, version: int
                  ) -> PlanVersion:
    if code not in versions:
        versions[code] = _stored_versions(conn, code)
    for stored in versions[code]:
        if stored.version == version:
            return to_version(stored)
    raise NotFound("plan version", f"{code} v{version}")
