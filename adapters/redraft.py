"""Redraft: a replacement invoice for a voided one ("a void and a new invoice", issue 21).

The replacement is the next revision of the same (organisation, period) — its own derived id,
drafted by InvoicingService.draft(..., redraft_voided=True) from the same inputs an invoice run
reads (the subscription, the plan versions, the period's usage, late usage of the lookback, the
meters' names). InvoiceRun.redraft calls it under the run's advisory lock, so a run and a
redraft never decide about one period at the same time. It gets a number when finalized; the
voided invoice keeps its own.

- Only a void invoice is redrafted (Conflict otherwise); one already replaced by a live
  revision answers Conflict naming the replacement.
- An organisation a dead-lettered entry can affect is not redrafted (Conflict with the run's
  reason: redrive first), nor one with nothing to bill (Conflict with the skip's reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from uuid import UUID

from psycopg_pool import ConnectionPool

from adapters import invoice_run as run  # the run's readers, shared
from adapters.bookkeeping import tracked_position
from adapters.gate import PgProjectionGate
from adapters.ledger import LedgerStore
from domain.audit import Actor
from domain.errors import Conflict, ValidationFailed
from domain.invoice import VOID, Invoice
from domain.late_usage import late_usage
from domain.organisation import Organisation
from domain.period import first_day
from domain.services import invoice_runs as decide
from domain.services.base import Written
from domain.services.invoice_runs import DeadLettered
from domain.services.invoicing import CREATED, SKIPPED, InvoicingService
from projections import invoices, plans, usage_totals

log = logging.getLogger("billing.redraft")

REDRAFT_CATCH_UP_WAIT_S = 60.0  # the read models a draft reads must include every earlier write


def redraft_voided(
    ident: UUID, *, pool: ConnectionPool, ledger: LedgerStore, gate: PgProjectionGate,
    invoicing: InvoicingService, supplier_state_code: str, read_models: tuple[str, ...],
    dead_lettered: Callable[[list[str]], DeadLettered], actor: Actor | None,
) -> Written[Invoice]:
    """Draft the replacement of the voided invoice `ident` (call under the run's lock)."""
    voided = invoicing.invoice(ident)  # NotFound: unknown invoice
    if voided.status != VOID:
        raise Conflict(f"invoice {voided.id} is {voided.status}, not void: only a voided invoice "
                       "is redrafted (void it first)")
    period, org_id = voided.period, voided.organisation_id
    head = ledger.head()
    for name in read_models:
        gate.wait_for(name, head, REDRAFT_CATCH_UP_WAIT_S)
    dead = dead_lettered(decide.usage_periods(period))
    org = ledger.get(org_id, Organisation)
    earlier = decide.lookback_periods(period)
    with pool.connection() as conn:
        history = plans.history_entries(plans.subscription_history(conn, org_id))
        stuck = decide.blocked(org_id, org.name, dead, (entry.plan_code for entry in history))
        if stuck is not None:
            raise Conflict(f"{org.name} is not redrafted: {decide.blocked_reason(stuck)}")
        versions = {code: run._stored_versions(conn, code) for code in {e.plan_code for e in history}}
        usage_position = tracked_position(conn, usage_totals.NAME)
        quantities = usage_totals.period_quantities(conn, first_day(period)).get(org_id, {})
        billed_by = [ledger.get(i, Invoice) for i in invoices.billing_invoices(
            conn, decide.billing_periods(period)).get(org_id, [])]
        totals = decide.lookback_totals(org_id, {
            q: usage_totals.period_quantities(conn, first_day(q)) for q in earlier})
        late = late_usage(org_id, earlier, billed_by, totals,
                          partial(run._plan_version, versions, conn), note=log.error)
        meter_names = run._meter_names(conn)
    draft = partial(invoicing.draft, org, period=period, subscription_history=history,
                    plan_versions=versions, quantities=quantities, usage_position=usage_position,
                    supplier_state_code=supplier_state_code, redraft_voided=True,
                    meter_names=meter_names, actor=actor)
    try:
        written, status, why = draft(late=late)
    except ValidationFailed as e:
        kept = decide.late_items_to_keep(late, e)
        if kept is None:
            raise
        log.error("redraft %s: %s: late usage left out: %s", period, org_id, e)
        written, status, why = draft(late=kept)
    if status == SKIPPED or written is None:
        raise Conflict(f"nothing to redraft for {period}: {why}")
    if status != CREATED:
        raise Conflict(f"invoice {voided.id} was already replaced by invoice {written.aggregate.id} "
                       f"({written.aggregate.status})")
    return written
