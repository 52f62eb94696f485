"""Invoices: draft a period, finalize (number it), void.

get -> decide -> save through the Ledger port, the clock passed in; no other I/O. The caller
(the invoice run) reads what a draft is computed from — the organisation, its subscription
schedule, the plan versions, the period's quantities and the ledger position they were read
up to — and passes it in, so a draft is a pure function of its arguments.

Idempotency: an invoice's id is derived from (organisation, period), so a second draft of the
same period finds the first one ('existing'), and two runs racing to draft it collide in the
ledger (Conflict on the duplicate id), which is 'existing' too. Numbering: the invoice and its
financial year's InvoiceSequence are saved in one atomic append; losing the race for a number
means deciding again from the fresh sequence, a bounded number of times (domain.numbering).
The rules are written down in docs/INVOICES.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

from domain.audit import Actor
from domain.errors import Conflict, FieldError, NotFound, Unavailable, ValidationFailed
from domain.invoice import DRAFT, FIRST_REVISION, VOID, Invoice, invoice_id
from domain.numbering import InvoiceSequence, financial_year, sequence_id
from domain.period import parse_period, period_bounds, period_has_ended
from domain.plan import StoredVersion, to_version
from domain.ports import Billable, Clock, Ledger, Pause
from domain.pricing import LateUsage, PlanVersion, price
from domain.services.base import Written
from domain.subscription import SubscriptionEntry, plan_for_period
from domain.tax import TaxFacts

DraftStatus = Literal["created", "existing", "skipped"]
CREATED: DraftStatus = "created"
EXISTING: DraftStatus = "existing"
SKIPPED: DraftStatus = "skipped"

# Concurrent finalizations of one financial year all want the sequence's next version; each
# round at least one of them wins, so this bounds the wait of the unluckiest under a burst.
FINALIZE_ATTEMPTS = 64
VOID_ATTEMPTS = 3  # a void races only with a finalize or a payment of the same invoice
PRICED_VERSIONS_MAX = 256  # plan versions whose pricing form a service keeps
REVISIONS_MAX = 100  # replacements of voided invoices of one (organisation, period)
ZERO = Decimal(0)


def skip_reason_no_plan(history: Sequence[SubscriptionEntry], period: str, timezone: str) -> str:
    """Why no plan covers `period` (in `timezone`): never subscribed, or subscribed only from a
    later period (else the subscription's entries leave the period uncovered)."""
    if not history:
        return "no plan covers the period: never subscribed"
    end = period_bounds(period, timezone)[1]
    first = min(entry.effective_from for entry in history).astimezone(ZoneInfo(timezone))
    if first >= end:
        return (f"no plan covers the period: subscribed from {first.isoformat()}, "
                f"after {period} ended")
    return f"no plan covers the period: no subscription in force during {period}"


def _no_pause(attempt: int) -> None:
    """Retry at once: the ledger serialises appends, so a retry queues behind the winner."""


class InvoicingService:
    """Drafts, finalizes and voids invoices."""

    def __init__(self, ledger: Ledger, clock: Clock, pause: Pause = _no_pause) -> None:
        self._ledger = ledger
        self._clock = clock
        self._pause = pause
        # id(stored version) -> (that object, kept alive so the id stays its own; its pricing)
        self._versions: dict[int, tuple[StoredVersion, PlanVersion]] = {}

    # ---- draft ----------------------------------------------------------------------------

    def draft(
        self,
        organisation: Billable,
        *,
        period: str,
        subscription_history: Sequence[SubscriptionEntry],
        plan_versions: Mapping[str, Sequence[StoredVersion]],
        quantities: Mapping[str, Decimal],
        usage_position: int,
        supplier_state_code: str,
        late: Sequence[LateUsage] = (),
        redraft_voided: bool = False,
        meter_names: Mapping[str, str] | None = None,
        actor: Actor | None,
    ) -> tuple[Written[Invoice] | None, DraftStatus, str]:
        """Draft the organisation's invoice for `period` ('YYYY-MM', a period that has ended in
        the organisation's timezone), or find the one already drafted.

        - 'existing' (with that invoice, position 0): the period already has an invoice. A
          voided one counts too, unless `redraft_voided`: then a replacement (next revision)
          is drafted — the "void plus a new invoice" correction.
        - 'skipped' (None): no plan covers the period, or every line amounts to 0; the third
          item says which (skip_reason_no_plan, or "every line amounts to 0"), for the run's
          report. It is "" for the other statuses.
        - 'created': a new draft priced by domain.pricing.price with the plan version pinned
          by plan_for_period; `plan_versions` maps plan codes to their published versions.

        `quantities` are the period's quantities per meter (a charged meter missing is 0),
        read up to ledger position `usage_position`. `late` is the hook for usage that reached
        already-finalized periods: it is priced as "late usage for <period>" lines on this
        invoice (domain.pricing.late_usage_lines) and recorded on it; finding that usage is
        the caller's job and not done here yet. `meter_names` (meter code -> name, from the
        catalogue) describe the charge lines; they are recorded on the draft, so the invoice
        keeps the name it was issued with.
        """
        newest = self._newest(organisation.id, period)
        invoice, status, why = self.decide_draft(
            organisation, newest, period=period, subscription_history=subscription_history,
            plan_versions=plan_versions, quantities=quantities, usage_position=usage_position,
            supplier_state_code=supplier_state_code, late=late, redraft_voided=redraft_voided,
            meter_names=meter_names)
        if status == EXISTING:
            assert newest is not None
            return Written(newest, 0), EXISTING, ""
        if invoice is None:
            return None, status, why
        try:
            return Written(invoice, self._ledger.save(invoice, actor=actor)), CREATED, ""
        except Conflict:  # another run drafted it first
            return Written(self._ledger.get(invoice.id, Invoice), 0), EXISTING, ""

    def decide_draft(
        self,
        organisation: Billable,
        newest: Invoice | None,
        *,
        period: str,
        subscription_history: Sequence[SubscriptionEntry],
        plan_versions: Mapping[str, Sequence[StoredVersion]],
        quantities: Mapping[str, Decimal],
        usage_position: int,
        supplier_state_code: str,
        late: Sequence[LateUsage] = (),
        redraft_voided: bool = False,
        meter_names: Mapping[str, str] | None = None,
    ) -> tuple[Invoice | None, DraftStatus, str]:
        """`draft`'s decision without its reads and its save: `newest` is the period's newest
        invoice revision (None: there is none). Answers the new draft, not saved yet, with
        'created'; None with 'existing' or 'skipped' (and why, for 'skipped'). The invoice run
        reads many organisations' `newest` at once and saves many drafts per append."""
        parse_period(period)
        if usage_position < 0:
            raise ValidationFailed([FieldError("usage_position", "must be a ledger position >= 0")])
        if newest is not None and (newest.status != VOID or not redraft_voided):
            return None, EXISTING, ""
        revision = FIRST_REVISION if newest is None else newest.revision + 1
        if revision > REVISIONS_MAX:
            raise Conflict(f"the invoice for {period} was replaced {REVISIONS_MAX} times; "
                           "no more replacements")
        now = self._clock()
        if not period_has_ended(period, organisation.timezone, now):
            end = period_bounds(period, organisation.timezone)[1]
            raise ValidationFailed([FieldError(
                "period", f"{period} has not ended yet for this organisation (it ends at "
                          f"{end.isoformat()}); it can be invoiced after that")])
        priced_by = plan_for_period(
            subscription_history, period, organisation.timezone,
            {code: [(v.version, v.published_at) for v in versions]
             for code, versions in plan_versions.items()},
        )
        if priced_by is None:
            return None, SKIPPED, skip_reason_no_plan(
                subscription_history, period, organisation.timezone)
        stored = _pinned(plan_versions, priced_by.plan_code, priced_by.version)
        if stored.currency != organisation.currency:
            raise Conflict(f"plan {stored.code!r} is priced in {stored.currency}; the organisation "
                           f"is billed in {organisation.currency}")
        plan = self._priced_version(stored)
        charged = {c.metric: quantities.get(c.metric, ZERO) for c in plan.charges}
        tax = TaxFacts(organisation.country, organisation.state_code, supplier_state_code)
        priced = price(plan, charged, tax, late, meter_names=meter_names)
        if all(line.amount == 0 for line in priced.lines):
            # docs/PRICING.md: base fee / minimum, "or none if 0"
            return None, SKIPPED, (f"every line amounts to 0 (plan {plan.code!r} "
                                   f"v{plan.version})")
        invoice = Invoice.draft(
            organisation_id=organisation.id, period=period, revision=revision, priced=priced,
            plan_code=plan.code, plan_version=plan.version, quantities=charged,
            usage_position=usage_position, tax=tax, late=late, at=now,
            gstin=organisation.gstin or "", plan_name=plan.name,
        )
        return invoice, CREATED, ""

    def _priced_version(self, stored: StoredVersion) -> PlanVersion:
        """`to_version(stored)`, once per stored version object: a run prices thousands of
        organisations with the same few versions."""
        cached = self._versions.get(id(stored))
        if cached is not None and cached[0] is stored:
            return cached[1]
        plan = to_version(stored)
        if len(self._versions) >= PRICED_VERSIONS_MAX:
            self._versions.clear()
        self._versions[id(stored)] = (stored, plan)
        return plan

    def _newest(self, organisation_id: UUID, period: str) -> Invoice | None:
        """The newest revision of the period's invoice: revision n + 1 exists only once
        revision n is void, so the walk stops at the first missing or non-void one."""
        newest: Invoice | None = None
        for revision in range(FIRST_REVISION, REVISIONS_MAX + 1):
            try:
                newest = self._ledger.get(invoice_id(organisation_id, period, revision), Invoice)
            except NotFound:
                break
            if newest.status != VOID:
                break
        return newest

    # ---- lifecycle -------------------------------------------------------------------------

    def invoice(self, ident: UUID) -> Invoice:
        """The invoice from the ledger; NotFound for an unknown id."""
        try:
            return self._ledger.get(ident, Invoice)
        except NotFound:
            raise NotFound("invoice", ident) from None

    def finalize(self, ident: UUID, *, actor: Actor | None) -> Written[Invoice]:
        """Give a draft the next number of the current financial year (IST) and freeze it.
        Conflict if it is not a draft; Unavailable if the numbering stayed contended."""
        for attempt in range(FINALIZE_ATTEMPTS):
            invoice = self.invoice(ident)
            invoice.check_can_finalize()
            now = self._clock()
            year = financial_year(now)
            try:
                sequence = self._ledger.get(sequence_id(year), InvoiceSequence)
            except NotFound:
                sequence = InvoiceSequence.open(year, now)
            invoice.finalize(sequence.issue(invoice.id, now), now)
            try:
                return Written(invoice, self._ledger.save(invoice, sequence, actor=actor))
            except Conflict:  # another finalization took that number (or changed this invoice)
                self._pause(attempt)
        raise Unavailable("invoice numbering is busy; retry the finalization", retry_after_s=1)

    def finalize_batch(self, idents: Sequence[UUID], *, actor: Actor | None,
                       loaded: Mapping[UUID, Invoice] | None = None,
                       sequences: dict[int, InvoiceSequence] | None = None) -> list[Invoice]:
        """Finalize the drafts among `idents` in one ledger append: read them at once, advance
        the financial year's InvoiceSequence in memory, and save the invoices with the sequence
        atomically (all numbered, or none). Numbers stay gapless: the sequence's next version
        is claimed by the append, and a lost race (another finalization took a number, or
        changed one of them) decides the whole batch again from a fresh read. Ids that are not
        drafts (finalized already, void, unknown) are left as they are. Returns the invoices
        this call finalized, in `idents` order. Unavailable if the numbering stayed contended.

        `loaded`: the invoices as the caller just read them (the first attempt uses them rather
        than reading again). `sequences`: the caller's cache of sequences by financial year,
        across batches: a year's sequence replays one event per number issued, so a caller
        numbering many batches keeps the one it saved last (a stale one only loses the race
        on its version, and is then read afresh)."""
        cache: dict[int, InvoiceSequence] = {} if sequences is None else sequences
        for attempt in range(FINALIZE_ATTEMPTS):
            found = (loaded if loaded is not None and attempt == 0
                     else self._ledger.get_many(idents, Invoice))
            drafts = [found[i] for i in dict.fromkeys(idents) if i in found
                      and found[i].status == DRAFT]
            if not drafts:
                return []
            now = self._clock()
            year = financial_year(now)
            sequence = cache.pop(year, None)
            if sequence is None:
                try:
                    sequence = self._ledger.get(sequence_id(year), InvoiceSequence)
                except NotFound:
                    sequence = InvoiceSequence.open(year, now)
            for invoice in drafts:
                invoice.finalize(sequence.issue(invoice.id, now), now)
            groups: list[tuple[Invoice | InvoiceSequence, ...]] = [(i,) for i in drafts[:-1]]
            groups.append((drafts[-1], sequence))
            try:
                self._ledger.save_batch(groups, actor=actor)
            except Conflict:
                self._pause(attempt)
                continue
            cache[year] = sequence
            return drafts
        raise Unavailable("invoice numbering is busy; retry the finalization", retry_after_s=1)

    def void(self, ident: UUID, reason: str = "", *, actor: Actor | None) -> Written[Invoice]:
        """Cancel a draft or finalized invoice (a finalized one keeps its number)."""
        for attempt in range(VOID_ATTEMPTS):
            invoice = self.invoice(ident)
            invoice.void(reason, self._clock())
            try:
                return Written(invoice, self._ledger.save(invoice, actor=actor))
            except Conflict:
                if attempt == VOID_ATTEMPTS - 1:
                    raise
                self._pause(attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _pinned(
    plan_versions: Mapping[str, Sequence[StoredVersion]], code: str, version: int | None
) -> StoredVersion:
    for stored in plan_versions.get(code, ()):
        if stored.version == version:
            return stored
    raise NotFound("plan version", f"{code} v{version}")
