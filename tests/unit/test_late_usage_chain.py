"""A property of the late-usage chain (domain.late_usage.late_usage) over random arrival
orders: whatever order usage arrives in between runs, whichever drafts are finalized when,
and with adjacent runs swapped (a catch-up), every period ends up billed exactly once across
its own invoice and the late lines of later ones — in quantity and, per charge, in paise."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.invoice import Invoice
from domain.late_usage import late_usage
from domain.money import to_paise
from domain.organisation import Organisation, OrganisationSettings
from domain.period import shift_period
from domain.plan import ChargeSpec, Plan, StoredVersion, TierSpec, to_version
from domain.pricing import PlanVersion, charge_amount
from domain.services.invoice_runs import LATE_LOOKBACK_PERIODS
from domain.services.invoicing import InvoicingService
from domain.subscription import SubscriptionEntry
from tests.unit.memory import Clock, MemoryLedger

IST = ZoneInfo("Asia/Kolkata")
FIRST = "2026-07"
BILLED_PERIODS = 6  # usage arrives for 2026-07 .. 2026-12
RUNS = BILLED_PERIODS + LATE_LOOKBACK_PERIODS  # two more runs pick up the last late usage
METRICS = ("calls", "gb")
CHARGES = (ChargeSpec("calls", "per_unit", unit_price=Decimal("1.5")),
           ChargeSpec("gb", "graduated", tiers=(TierSpec(Decimal(3), Decimal(2)),
                                                TierSpec(None, Decimal(1), Decimal(5)))))
EXAMPLES = settings(max_examples=150, deadline=None)


def plan() -> StoredVersion:
    return Plan.publish("late", "Late", "INR", Decimal(10), Decimal(0), CHARGES, set(METRICS),
                        datetime(2026, 1, 1, tzinfo=IST)).latest


@dataclass
class Billing:
    """The invoice run's decisions, with an in-memory ledger standing in for the read models."""

    version: StoredVersion = field(default_factory=plan)
    ledger: MemoryLedger = field(default_factory=MemoryLedger)
    usage: dict[str, dict[str, Decimal]] = field(default_factory=dict)  # period -> metric -> q
    drafted: dict[str, UUID] = field(default_factory=dict)  # period -> invoice id

    def __post_init__(self) -> None:
        self.invoicing = InvoicingService(self.ledger, Clock(datetime(2028, 1, 1, tzinfo=IST)))
        self.org = Organisation.create(uuid4(), OrganisationSettings(name="Late", billing_email="a@b.in"),
                                       datetime(2026, 1, 1, tzinfo=IST))

    def arrive(self, period: str, metric: str, quantity: int) -> None:
        by_metric = self.usage.setdefault(period, {})
        by_metric[metric] = by_metric.get(metric, Decimal(0)) + quantity

    def plan_version(self, code: str, version: int) -> PlanVersion:
        assert (code, version) == (self.version.code, self.version.version)
        return to_version(self.version)

    def run(self, period: str) -> None:
        if period in self.drafted:
            return  # existing
        window = {shift_period(period, k) for k in range(-LATE_LOOKBACK_PERIODS, LATE_LOOKBACK_PERIODS)}
        billed_by = [self.ledger.get(ident, Invoice) for p, ident in self.drafted.items() if p in window]
        earlier = [shift_period(period, -back) for back in range(LATE_LOOKBACK_PERIODS, 0, -1)]
        late = late_usage(self.org.id, earlier, billed_by, self.usage, self.plan_version)
        written, status, _ = self.invoicing.draft(
            self.org, period=period,
            subscription_history=[SubscriptionEntry("late", datetime(2026, 1, 1, tzinfo=IST))],
            plan_versions={"late": [self.version]}, quantities=self.usage.get(period, {}),
            usage_position=0, supplier_state_code="29", late=late, actor=None)
        assert status == "created" and written is not None
        self.drafted[period] = written.aggregate.id

    def billed(self, period: str) -> dict[str, tuple[Decimal, int]]:
        """metric -> (quantity, paise) billed for `period` across every invoice."""
        out: dict[str, tuple[Decimal, int]] = {}
        for ident in self.drafted.values():
            invoice = self.ledger.get(ident, Invoice)
            for line in invoice.lines:
                own = invoice.period == period and line.description == line.metric
                if line.metric is not None and (own or line.description == f"late usage for {period}"):
                    quantity, paise = out.get(line.metric, (Decimal(0), 0))
                    out[line.metric] = (quantity + line.quantity, paise + line.amount)
        return out


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[int], list[list[tuple[int, str, int]]], list[set[int]]]:
    """A run order (adjacent runs may be swapped), the usage arriving before each run (period
    index, metric, quantity) and the drafts finalized before each run."""
    order = list(range(RUNS))
    for i in range(RUNS - 1):
        if order[i] == i and order[i + 1] == i + 1 and draw(st.booleans()) and draw(st.booleans()):
            order[i], order[i + 1] = order[i + 1], order[i]
    arrivals: list[list[tuple[int, str, int]]] = []
    done: set[int] = set()
    for current in order:
        # Usage for period q arrives only before the run of q + 2 (35 days late at most) and
        # once q has begun (q is at most the period being run).
        open_periods = [q for q in range(min(current + 1, BILLED_PERIODS))
                        if q + LATE_LOOKBACK_PERIODS not in done]
        arrivals.append(draw(st.lists(st.tuples(st.sampled_from(open_periods), st.sampled_from(METRICS),
                                                st.integers(1, 4)), max_size=4)) if open_periods else [])
        done.add(current)
    finalize = [draw(st.sets(st.integers(0, RUNS - 1), max_size=3)) for _ in order]
    return order, arrivals, finalize


@EXAMPLES
@given(schedule=schedules())
def test_every_period_is_billed_exactly_once_whatever_the_arrival_order(
    schedule: tuple[list[int], list[list[tuple[int, str, int]]], list[set[int]]],
) -> None:
    order, arrivals, finalize = schedule
    billing = Billing()
    periods = [shift_period(FIRST, i) for i in range(RUNS)]
    for current, arriving, finalizing in zip(order, arrivals, finalize, strict=True):
        for q, metric, quantity in arriving:
            billing.arrive(periods[q], metric, quantity)
        for index in finalizing:  # some drafts are finalized along the way, most are not
            ident = billing.drafted.get(periods[index])
            if ident is not None and billing.ledger.get(ident, Invoice).status == "draft":
                billing.invoicing.finalize(ident, actor=None)
        billing.run(periods[current])
    charges = {c.metric: c for c in to_version(billing.version).charges}
    for period in periods[:BILLED_PERIODS]:
        usage = {m: billing.usage.get(period, {}).get(m, Decimal(0)) for m in METRICS}
        expected = {m: (q, to_paise(charge_amount(charges[m], q))) for m, q in usage.items()}
        assert billing.billed(period) == expected, (period, billing.usage)
