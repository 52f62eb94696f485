"""The invoice run: draft every subscribed organisation's invoice for a period, from usage
totals that are caught up with the ledger (numbering the drafts is
adapters/period_numbering.py's; which organisations dead letters block,
adapters/dead_letter_scope.py's). This module reads (Postgres, the ledger), locks, appends,
records the run (projections/invoice_runs.py) and logs; what to do with what it read is
decided by the pure functions of
domain/services/invoice_runs.py and InvoicingService.decide_draft.

- Fast (issue 19; docs/INVOICES.md, A fast run): ORGS_PER_BATCH organisations at a time, their
  inputs read in one query each, priced in memory, their drafts appended DRAFTS_PER_APPEND per
  ledger transaction (one batch appended while the next is priced), helper processes taking
  batches too (adapters/invoice_run_helpers.py). Killed at any point and run again, each
  invoice is drafted once (derived ids; a batch commits whole or not at all).

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
- Each run is recorded with its progress, counts and the organisations not invoiced with why;
  the log has the counts and one line per organisation not invoiced (bounded).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar
from uuid import UUID, uuid4

from psycopg_pool import ConnectionPool

from adapters import dead_letter_scope
from adapters.bookkeeping import lock_key, record_blocked, tracked_position
from adapters.gate import PgProjectionGate
from adapters.gc_pace import fewer_collections
from adapters.invoice_run_helpers import BATCHES_IN_HAND_MAX, HELPERS_MAX, Helper, Recipe
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
from domain.services.invoice_runs import DeadLettered, Done, Outcome
from domain.services.invoicing import InvoicingService
from domain.subscription import SubscriptionEntry
from projections import catalogue, invoices, organisations, plans, usage_totals
from projections import invoice_runs as records
from projections.organisations import OrganisationRow

log = logging.getLogger("billing.invoice_run")
R = TypeVar("R")
# A batch read and priced: the outcomes of the organisations not drafted, and the drafts (each
# with its organisation's name) to append.
Priced = tuple[list[Done], list[tuple[Invoice, str]]]

CATCH_UP_WAIT_S = 60.0
# Why the run's lock is taken: an invoice run, a void or a redraft holds it, and each is told
# which can be in the way (a double-clicked redraft is refused by the first one, not by a run).
BUSY = "an invoice run, or a void or redraft of an invoice, is in progress"
READ_MODELS_USED = (usage_totals.NAME, plans.READ_MODEL.name, invoices.READ_MODEL.name,
                    organisations.NAME)
# Read models whose dead letters block the organisations they can affect: those the run reads,
# and the catalogue (meters, projects, keys) that pricing's inputs come from.
DEAD_LETTER_MODELS = (*READ_MODELS_USED, catalogue.READ_MODEL.name)
# Errors that are the infrastructure's, not one organisation's: they stop the run (a later run,
# or the scheduler's next one, does the rest; drafting is idempotent).
INFRASTRUCTURE = (*TRANSIENT, Unavailable)
ORGS_PER_BATCH = 1000  # organisations whose inputs are read at once, then priced in memory
# A run of at least this many organisations starts its helper processes (each takes about a
# second to start: a smaller run is done sooner without them).
HELPERS_FROM_ORGS = 4 * ORGS_PER_BATCH
DRAFTS_PER_APPEND = 500  # drafts per ledger transaction (each its own aggregate and events)


class InvoiceRun:
    def __init__(self, pool: ConnectionPool, ledger: LedgerStore, invoicing: InvoicingService,
                 supplier_state_code: str, clock: Callable[[], datetime], grace: timedelta,
                 schema: str, *, helpers: int = 0, helper_recipe: Recipe | None = None) -> None:
        """`helpers`: processes that take batches of a large run besides this one, each
        building its own run from `helper_recipe` (adapters/invoice_run_helpers.py); 0 or no
        recipe: every batch is done here."""
        if not 0 <= helpers <= HELPERS_MAX:
            raise ValueError(f"an invoice run has 0 to {HELPERS_MAX} helper processes")
        self._helpers = helpers
        self._helper_recipe = helper_recipe if helpers else None
        self._pool = pool
        self._ledger = ledger
        self._gate = PgProjectionGate(pool, ledger)
        self._invoicing = invoicing
        self._supplier = supplier_state_code
        self._clock = clock
        self._grace = grace
        self._lock_key = lock_key(schema, "invoice-run")

    def run(self, period: str, progress: Callable[[int, int], None] | None = None, *,
            actor: Actor | None, run_id: UUID | None = None,
            on_started: Callable[[UUID], None] | None = None) -> RunResult:
        """Run `period`; the drafts are saved on behalf of `actor` (None: the scheduler).
        The run is recorded as `run_id` (a new id when None) in projections/invoice_runs.py;
        `on_started` is told that id once the run holds the lock and its record exists (the API
        answers 202 from there); `progress` is told (organisations done, total) after each
        batch."""
        check_period_has_ended_somewhere(period, self._clock())
        with self._exclusive(f"{BUSY}; try again when it ends"), fewer_collections():
            return self._run(period, progress, actor, run_id or uuid4(), on_started)

    def void(self, ident: UUID, reason: str, *, actor: Actor | None) -> Written[Invoice]:
        """Void under the run's lock: a run reads which invoices billed late usage, then drafts;
        a void in between would leave that usage on a void invoice and on no other."""
        with self._exclusive(f"{BUSY}; void the invoice when it ends"):
            return self._invoicing.void(ident, reason, actor=actor)

    def redraft(self, ident: UUID, *, actor: Actor | None) -> Written[Invoice]:
        """A replacement for the voided invoice `ident` (adapters/redraft.py), under the run's
        lock: a run and a redraft never draft one period at once (Conflict while a run runs)."""
        from adapters.redraft import redraft_voided  # it reads with this module's helpers

        with self._exclusive(f"{BUSY}; redraft the invoice when it ends"):
            return redraft_voided(
                ident, pool=self._pool, ledger=self._ledger, gate=self._gate,
                invoicing=self._invoicing, supplier_state_code=self._supplier,
                read_models=DEAD_LETTER_MODELS, dead_lettered=self._dead_lettered, actor=actor)

    def move_start(self, call: Callable[[], R]) -> R:
        """`call` under the run's lock (domain.ports.InvoiceRunner.move_start)."""
        with self._exclusive(f"{BUSY}; move the subscription's start when it ends"):
            return call()

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
             actor: Actor | None, run_id: UUID, on_started: Callable[[UUID], None] | None
             ) -> RunResult:
        head = self._ledger.head()
        # Every model whose dead letters are checked, too: caught up to the head, each entry
        # before it is applied or recorded as a dead letter, so the check misses none.
        for name in DEAD_LETTER_MODELS:
            self._gate.wait_for(name, head, CATCH_UP_WAIT_S)
        now = self._clock()
        dead = self._dead_lettered(decide.usage_periods(period))
        missing = decide.organisations_to_run((), dead, plans.READ_MODEL.name)
        with self._pool.connection() as conn:
            records.interrupt_running(conn, now)
            batch = _Batch(period=period, now=now, dead=dead, actor=actor,
                           usage_position=tracked_position(conn, usage_totals.NAME),
                           meter_names=_meter_names(conn))
            total = plans.subscribed_count(conn) + len(missing)
            records.started(conn, run_id, period, _started_by(actor), now, total)
        if on_started is not None:
            on_started(run_id)
        log.info("invoice run %s (%s) started: %d organisations", period, run_id, total)
        counted = decide.Tally()
        report = partial(self._counted, counted, run_id, total, progress)
        helpers: list[Helper] = []
        try:
            helpers = self._start_helpers(total)
            # One batch's drafts are appended (a thread of their own, waiting on Postgres)
            # while the next batch is read and priced: at most one append in flight. A helper
            # process with room in hand is handed the next batch instead (it does the same).
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="invoice-append") as appender:
                appending: Future[list[Done]] | None = None
                handed = 0  # organisations handed out so far, here or to helpers
                for chunk in self._chunks(missing):
                    handed += len(chunk)
                    idle = self._idle_helper(helpers, report, _in_hand_max(total - handed,
                                                                           len(helpers)))
                    if idle is not None:
                        idle.submit(batch, chunk, actor)
                        continue
                    drafts = self._batch(batch, chunk, counted.add)
                    if appending is not None:
                        report(appending.result())
                    appending = appender.submit(self._append_all, drafts, actor)
                if appending is not None:
                    report(appending.result())
                for helper in helpers:
                    while helper.in_hand:
                        report(helper.result())
            if helpers:
                log.info("invoice run %s (%s): %d batches drafted by %d helper processes",
                         period, run_id, sum(h.batches for h in helpers), len(helpers))
        except BaseException as e:
            with contextlib.suppress(Exception), self._pool.connection() as conn:
                records.finished(conn, run_id, counted.done, counted.result(period),
                                 self._clock(), error=f"{type(e).__name__}: {e}")
            raise
        finally:
            for helper in helpers:
                helper.stop()
        result = counted.result(period, run_id)
        with self._pool.connection() as conn:
            record_blocked(conn, period, result.blocked)
            records.finished(conn, run_id, counted.done, result, self._clock())
        _log_result(run_id, result)
        return result

    def _chunks(self, missing: list[UUID]) -> Iterator[list[UUID]]:
        """The organisations to run, ORGS_PER_BATCH at a time in id order: the subscribed ones
        a page at a time, merged with `missing` (blocked: their subscription is dead-lettered)."""
        after: UUID | None = None
        rest = sorted(missing)
        while True:
            with self._pool.connection() as conn:
                page = plans.subscribed_page(conn, after, ORGS_PER_BATCH)
            if len(page) < ORGS_PER_BATCH:  # the last page: every missing one left goes too
                ours, rest = rest, []
            else:
                ours = [m for m in rest if m <= page[-1]]
                rest = rest[len(ours):]
            chunk = sorted(set(page) | set(ours))
            if chunk:
                yield chunk
            if len(page) < ORGS_PER_BATCH:
                return
            after = page[-1]

    def price_batch(self, batch: _Batch, chunk: list[UUID]) -> Priced:
        """One batch read and priced (what a helper process does with a batch it is handed,
        before append_batch): what was done with each organisation not drafted, and the
        drafts to append."""
        outcomes: list[Done] = []
        drafts = self._batch(batch, chunk, outcomes.append)
        return outcomes, drafts

    def append_batch(self, drafts: list[tuple[Invoice, str]], actor: Actor | None
                     ) -> list[Done]:
        """A priced batch's drafts appended: what was done with each (created or existing)."""
        return self._append_all(drafts, actor)

    def _batch(self, batch: _Batch, chunk: list[UUID], add: Callable[[Done], None]
               ) -> list[tuple[Invoice, str]]:
        """Read a batch of organisations' inputs at once and price each in memory: the drafts
        to append (with each organisation's name); every other outcome goes to `add`."""
        period = batch.period
        earlier = decide.lookback_periods(period)
        drafts: list[tuple[Invoice, str]] = []
        with self._pool.connection() as conn:
            # Read before the totals: they include the ledger at least up to here.
            batch.usage_position = tracked_position(conn, usage_totals.NAME)
            drafted = invoices.existing_of(conn, period, chunk)
            todo = [o for o in chunk if o not in drafted]
            # The read model (caught up to the run's start) has every organisation's settings
            # in one query; the ledger is read only for one it lacks (dead-lettered there).
            orgs: dict[UUID, Organisation | OrganisationRow] = {
                **organisations.get_many(conn, todo)}
            orgs |= self._ledger.get_many([o for o in todo if o not in orgs], Organisation)
            unreadable: dict[UUID, Exception] = {}
            histories = _bulk(conn, todo, partial(plans.subscription_histories, conn),
                              list, unreadable)
            quantities = _bulk(conn, todo, partial(usage_totals.period_quantities, conn,
                                                   first_day(period)), dict, unreadable)
            earlier_totals = {q: _bulk(conn, todo, partial(usage_totals.period_quantities, conn,
                                                           first_day(q)), dict, unreadable)
                              for q in earlier}
            billing = invoices.billing_invoices_of(conn, decide.billing_periods(period), todo)
            billed = self._ledger.get_many([i for ids in billing.values() for i in ids], Invoice)
            for org_id in chunk:
                if org_id in drafted:
                    add(Done(org_id, "existing"))
                    continue
                org = orgs.get(org_id)
                try:
                    if org is None:
                        raise NotFound("Organisation", org_id)
                    if org_id in unreadable:
                        raise unreadable[org_id]
                    one = self._decide_one(
                        conn, batch, org, plans.history_entries(histories.get(org_id, [])),
                        [billed[i] for i in billing.get(org_id, []) if i in billed], earlier,
                        decide.lookback_totals(org_id, earlier_totals),
                        quantities.get(org_id, {}))
                except INFRASTRUCTURE:
                    raise  # Postgres away: the run stops, and a later run does the rest
                except Exception as e:  # one organisation's problem, of any kind, is its own
                    if isinstance(e, DomainError):
                        log.error("invoice run %s: %s not drafted: %s", period, org_id, e)
                    else:
                        log.exception("invoice run %s: %s not drafted: %s", period, org_id,
                                      type(e).__name__)
                    add(Done(org_id, "failed", name=org.name if org else "",
                             reason=decide.failed_reason(e)))
                    continue
                if isinstance(one, Done):
                    add(one)
                else:
                    drafts.append((one, org.name if org else ""))
        return drafts

    def _append_all(self, drafts: list[tuple[Invoice, str]], actor: Actor | None) -> list[Done]:
        """Append a batch's drafts, DRAFTS_PER_APPEND per ledger transaction."""
        out: list[Done] = []
        for start in range(0, len(drafts), DRAFTS_PER_APPEND):
            for invoice, name, status in self._append(drafts[start:start + DRAFTS_PER_APPEND],
                                                      actor):
                out.append(Done(invoice.organisation_id, status, name=name))
        return out

    def _start_helpers(self, total: int) -> list[Helper]:
        """The helper processes for a run of `total` organisations: none for a run too small
        to repay starting them (about a second each)."""
        if self._helper_recipe is None or total < HELPERS_FROM_ORGS:
            return []
        return [Helper(self._helper_recipe) for _ in range(self._helpers)]

    @staticmethod
    def _idle_helper(helpers: list[Helper], report: Callable[[list[Done]], None],
                     in_hand_max: int) -> Helper | None:
        """A helper with fewer than `in_hand_max` batches in hand, once the answers of those
        done are counted."""
        for helper in helpers:
            while helper.done():
                report(helper.result())
        return min((h for h in helpers if h.in_hand < in_hand_max), default=None,
                   key=lambda h: h.in_hand)

    def _counted(self, counted: decide.Tally, run_id: UUID, total: int,
                 progress: Callable[[int, int], None] | None, outcomes: list[Done]) -> None:
        """A batch is done (appended here or by a helper): count it, record the progress and
        tell it."""
        for one in outcomes:
            counted.add(one)
        total = max(total, counted.done)
        if progress:
            progress(counted.done, total)
        with self._pool.connection() as conn:
            records.progressed(conn, run_id, counted.done, counted.result(""))

    def _append(self, drafts: list[tuple[Invoice, str]], actor: Actor | None
                ) -> list[tuple[Invoice, str, Outcome]]:
        """Save the drafts in one ledger append; when one of them exists already (another
        process drafted it meanwhile), each alone: that one is 'existing'."""
        try:
            self._ledger.save_batch([(invoice,) for invoice, _ in drafts], actor=actor)
            return [(invoice, name, "created") for invoice, name in drafts]
        except Conflict:
            pass
        out: list[tuple[Invoice, str, Outcome]] = []
        for invoice, name in drafts:
            try:
                self._ledger.save(invoice, actor=actor)
                out.append((invoice, name, "created"))
            except Conflict:
                out.append((invoice, name, "existing"))
        return out

    def _decide_one(self, conn: Any, batch: _Batch, org: Organisation | OrganisationRow,
                    history: list[SubscriptionEntry], billed_by: list[Invoice],
                    earlier: list[str], totals: Mapping[str, Mapping[str, Decimal]],
                    quantities: dict[str, Decimal]) -> Done | Invoice:
        """One organisation's new draft (not saved yet), or what was done instead and why."""
        period, org_id = batch.period, org.id
        if not decide.is_due(period, org.timezone, batch.now, self._grace):
            return Done(org_id, "not_due", name=org.name,
                        reason=decide.not_due_reason(period, org.timezone, self._grace))
        stuck = decide.blocked(org_id, org.name, batch.dead,
                               (entry.plan_code for entry in history))
        if stuck is not None:
            log.error("invoice run %s: %s (%s) not invoiced: dead-lettered entries %s",
                      period, org.name, org_id, stuck.read_models)
            return Done(org_id, "blocked", stuck, name=org.name,
                        reason=decide.blocked_reason(stuck))
        versions = batch.versions
        for entry in history:
            if entry.plan_code not in versions:
                versions[entry.plan_code] = _stored_versions(conn, entry.plan_code)
        late = late_usage(org_id, earlier, billed_by, totals,
                          partial(_plan_version, versions, conn), note=log.error)
        invoice, status, why = self._decide_draft(org, batch, history, quantities, late)
        if invoice is not None:
            return invoice
        if status == "skipped" and late:  # no plan covers the period, or all lines are 0
            log.error("invoice run %s: %s: nothing drafted, so late usage for %s is not "
                      "billed on it", period, org_id, [item.period for item in late])
        return Done(org_id, status, name=org.name, reason=why)

    def _decide_draft(self, org: Organisation | OrganisationRow, batch: _Batch,
                      history: list[SubscriptionEntry], quantities: dict[str, Decimal],
                      late: list[LateUsage]
                      ) -> tuple[Invoice | None, Outcome, str]:
        """The draft (or why not); drafted again without the late items pricing refused."""
        decide_draft = partial(
            self._invoicing.decide_draft, org, None, period=batch.period,
            subscription_history=history, plan_versions=batch.versions, quantities=quantities,
            usage_position=batch.usage_position, supplier_state_code=self._supplier,
            meter_names=batch.meter_names)
        try:
            return decide_draft(late=late)
        except ValidationFailed as e:
            kept = decide.late_items_to_keep(late, e)
            if kept is None:
                raise
            log.error("invoice run %s: %s: late usage left out, needs a credit note or a manual "
                      "correction: %s", batch.period, org.id, e)
            return decide_draft(late=kept)

    def _dead_lettered(self, usage_periods: list[str]) -> DeadLettered:
        """What every dead letter of DEAD_LETTER_MODELS blocks (adapters/dead_letter_scope.py)."""
        return dead_letter_scope.blocked_by(self._pool, self._ledger, DEAD_LETTER_MODELS,
                                            usage_periods)


def _in_hand_max(remaining: int, helpers: int) -> int:
    """How many batches a helper may hold: two (it prices one while it appends the other)
    while much remains; one towards the end, so that the run does not wait on a helper's
    second batch while it has nothing left to do itself."""
    return BATCHES_IN_HAND_MAX if remaining >= 2 * (helpers + 1) * ORGS_PER_BATCH else 1


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


@dataclass
class _Batch:
    """What every batch of one run shares: the run's instant, what dead letters block, the
    usage position, the meters' names, and the plan versions read so far."""

    period: str
    now: datetime
    dead: DeadLettered
    actor: Actor | None
    usage_position: int
    meter_names: Mapping[str, str]
    versions: dict[str, list[StoredVersion]] = field(default_factory=dict)


def _bulk(conn: Any, org_ids: list[UUID], read: Callable[[list[UUID]], dict[UUID, R]],
          empty: Callable[[], R], unreadable: dict[UUID, Exception]) -> dict[UUID, R]:
    """`read` of a batch of organisations at once; when that fails for something else than
    the infrastructure (one organisation's data that will not load), each organisation alone,
    so that only the ones whose data fails are failed (their errors go into `unreadable`).
    Each read in a savepoint: a failed statement must not abort the batch's transaction."""
    try:
        with conn.transaction():
            return read(org_ids)
    except INFRASTRUCTURE:
        raise
    except Exception:  # read again one by one, below, to find whose data it is
        pass
    out: dict[UUID, R] = {}
    for org_id in org_ids:
        try:
            with conn.transaction():
                out[org_id] = read([org_id]).get(org_id, empty())
        except INFRASTRUCTURE:
            raise
        except Exception as e:
            unreadable.setdefault(org_id, e)
    return out


def _started_by(actor: Actor | None) -> str:
    return "scheduler" if actor is None else str(actor.principal_id)


def _log_result(run_id: UUID, result: RunResult) -> None:
    """The run's counts, and each organisation not invoiced with why (bounded as the result
    is: RUN_ENTRIES_MAX, then how many more)."""
    log.info("invoice run %s (%s): created %d, existing %d, skipped %d, not due %d, failed %d, "
             "blocked %d", result.period, run_id, result.created, result.existing,
             result.skipped, result.not_due, result.failed, len(result.blocked))
    for entry in result.entries:
        log.info("invoice run %s: %s %s (%s): %s", result.period, entry.outcome, entry.name,
                 entry.organisation_id, entry.reason)
    if result.more:
        log.info("invoice run %s: and %d more not invoiced", result.period, result.more)
