"""Late usage: what the invoices of earlier periods have billed so far, and the late items the
next invoice must carry (docs/INVOICES.md, Late usage). Pure decisions over invoices already
read; the invoice run (adapters/invoice_run.py) reads them and drafts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from uuid import UUID

from domain.invoice import VOID, Invoice
from domain.money import MONEY_EXACT
from domain.pricing import LateUsage, PlanVersion, late_usage_lines

ZERO = Decimal(0)
Note = Callable[[str], None]  # told what was left out, and why


def _unnoted(message: str) -> None:
    """The default `note`: nobody listens."""


def own_invoice(period: str, billed_by: Sequence[Invoice], note: Note = _unnoted) -> Invoice | None:
    """The non-void invoice of `period` among `billed_by`, or None (never drafted, or void)."""
    own = [invoice for invoice in billed_by if invoice.period == period and invoice.status != VOID]
    if len(own) > 1:  # revision n + 1 exists only once revision n is void: never expected
        note(f"late usage: {len(own)} non-void invoices for {period}; the newest counts")
    return max(own, key=lambda invoice: invoice.revision, default=None)


def billed_quantities(period: str, own: Invoice, billed_by: Sequence[Invoice]) -> dict[str, Decimal]:
    """What the non-void invoices among `billed_by` (drafts too) have billed for `period` so
    far, per metric: its own invoice's quantities plus every late item's increment (corrected
    - billed). Without voids this is the latest cumulative correction; with one, the void's
    increments drop out, so the next late item bills them again."""
    billed = dict(own.quantities)
    for invoice in billed_by:
        if invoice.status == VOID:
            continue
        for item in invoice.late_usage:
            if item.period != period:
                continue
            for metric in item.corrected.keys() | item.billed.keys():
                increment = MONEY_EXACT.subtract(item.corrected.get(metric, ZERO),
                                                 item.billed.get(metric, ZERO))
                billed[metric] = MONEY_EXACT.add(billed.get(metric, ZERO), increment)
    return billed


def late_usage(organisation_id: UUID, earlier: Sequence[str], billed_by: Sequence[Invoice],
               totals: Mapping[str, Mapping[str, Decimal]],
               plan_version: Callable[[str, int], PlanVersion],
               note: Note = _unnoted) -> list[LateUsage]:
    """The late items of the next invoice: for each earlier period that has a non-void
    invoice, its usage `totals` now (period -> metric -> quantity) against billed_quantities.
    A metric whose usage went below what was billed needs a credit note: it is left out (and
    logged), while the period's other metrics and the other periods are still billed. An item
    whose amount would be negative (more usage can cost less on volume tiers) is left out too.
    Each left-out item is told to `note` (the caller logs it)."""
    late: list[LateUsage] = []
    for q in earlier:
        own = own_invoice(q, billed_by, note)
        if own is None:  # nothing drafted yet (a rerun of q bills it all), or voided on purpose
            continue
        billed = billed_quantities(q, own, billed_by)
        corrected = dict(billed)
        for metric, so_far in billed.items():
            now = totals.get(q, {}).get(metric, ZERO)
            if now < so_far:
                note(f"late usage: {organisation_id} {q} {metric} went down from {so_far} billed "
                     f"to {now}: needs a credit note; left out")
            else:
                corrected[metric] = now
        if corrected == billed:
            continue
        item = LateUsage(q, plan_version(own.plan_code, own.plan_version), billed, corrected)
        if sum(line.amount for line in late_usage_lines(item)) < 0:
            note(f"late usage: {organisation_id} {q} prices below what was billed ({billed} -> "
                 f"{corrected}): needs a credit note; left out")
            continue
        late.append(item)
    return late
