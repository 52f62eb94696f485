"""The invoice run's decisions (domain/services/invoice_runs.py), without Postgres or NATS:
not due, what dead letters block, the late-usage inputs, the draft retry without refused late
items, and the counting into a RunResult."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from eventsourcing.domain import Aggregate

from domain.errors import FieldError, ValidationFailed
from domain.invoice import Invoice
from domain.mail_record import InvoiceMail
from domain.meter import Meter
from domain.organisation import Organisation, OrganisationSettings
from domain.plan import ChargeSpec, Plan, to_version
from domain.pricing import LateUsage
from domain.project import Project
from domain.records import Blocked, RunEntry, RunResult
from domain.services.invoice_runs import (
    EVERYONE,
    LATE_LOOKBACK_PERIODS,
    DeadLettered,
    Done,
    OwnerOf,
    billing_periods,
    blocked,
    blocked_reason,
    dead_lettered,
    failed_reason,
    is_due,
    late_items_to_keep,
    lookback_periods,
    lookback_totals,
    not_due_reason,
    organisations_to_run,
    scope_of,
    scope_of_owner,
    tally,
    usage_periods,
)
from domain.usage import Usage

IST = ZoneInfo("Asia/Kolkata")
AT = datetime(2026, 9, 1, tzinfo=UTC)
GRACE = timedelta(hours=24)
PLANS_MODEL = "plans"


def usage(organisation_id: UUID, occurred_at: datetime, timezone: str = "Asia/Kolkata") -> Usage.Recorded:
    aggregate = Usage._create(
        Usage.Recorded, id=uuid4(), timestamp=occurred_at, organisation_id=organisation_id,
        project_id=uuid4(), event_id="e-1", metric="calls", value=Decimal(1),
        occurred_at=occurred_at, timezone=timezone, properties={})
    event = aggregate.pending_events[0]
    assert isinstance(event, Usage.Recorded)
    return event


def organisation() -> Organisation:
    return Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="a@b.in"), AT)


def late_item(period: str) -> LateUsage:
    stored = Plan.publish("p", "P", "INR", Decimal(10), Decimal(0),
                          [ChargeSpec("calls", "per_unit", unit_price=Decimal(1))], {"calls"}, AT).latest
    return LateUsage(period, to_version(stored), {"calls": Decimal(1)}, {"calls": Decimal(2)})


# ---- due -----------------------------------------------------------------------------------------


def test_a_period_is_due_once_it_has_ended_in_the_organisations_timezone_plus_the_grace() -> None:
    end = datetime(2026, 9, 1, tzinfo=IST)  # September starts in India
    assert not is_due("2026-08", "Asia/Kolkata", end, GRACE)
    assert not is_due("2026-08", "Asia/Kolkata", end + GRACE - timedelta(microseconds=1), GRACE)
    assert is_due("2026-08", "Asia/Kolkata", end + GRACE, GRACE)


def test_the_same_instant_can_be_due_in_one_timezone_and_not_in_another() -> None:
    at = datetime(2026, 9, 1, 3, tzinfo=UTC)  # 08:30 in India, still 31 August in California
    assert is_due("2026-08", "Asia/Kolkata", at, timedelta(0))
    assert not is_due("2026-08", "America/Los_Angeles", at, timedelta(0))


# ---- late usage inputs ---------------------------------------------------------------------------


def test_the_run_looks_back_two_periods_and_reads_invoices_up_to_the_next_period() -> None:
    assert LATE_LOOKBACK_PERIODS == 2
    assert lookback_periods("2026-01") == ["2025-11", "2025-12"]
    assert usage_periods("2026-01") == ["2025-11", "2025-12", "2026-01"]
    assert billing_periods("2026-01") == ["2025-11", "2025-12", "2026-01", "2026-02"]


def test_lookback_totals_are_one_organisations_and_empty_when_it_had_no_usage() -> None:
    mine, theirs = uuid4(), uuid4()
    totals = {"2026-06": {mine: {"calls": Decimal(3)}, theirs: {"calls": Decimal(9)}},
              "2026-07": {theirs: {"calls": Decimal(1)}}}
    assert lookback_totals(mine, totals) == {"2026-06": {"calls": Decimal(3)}, "2026-07": {}}


def test_the_retry_leaves_out_only_the_refused_late_items() -> None:
    late = [late_item("2026-06"), late_item("2026-07"), late_item("2026-08")]
    refusal = ValidationFailed([FieldError("late[1].plan.currency", "another currency")])
    assert late_items_to_keep(late, refusal) == [late[0], late[2]]


def test_a_refusal_that_is_not_only_about_late_items_is_not_retried() -> None:
    late = [late_item("2026-06")]
    mixed = ValidationFailed([FieldError("late[0]", "no"), FieldError("period", "not ended")])
    assert late_items_to_keep(late, mixed) is None
    assert late_items_to_keep(late, ValidationFailed([FieldError("period", "no")])) is None


# ---- dead letters --------------------------------------------------------------------------------


def test_a_usage_event_blocks_its_organisation_only_inside_the_periods_billed() -> None:
    org = uuid4()
    periods = usage_periods("2026-08")
    assert scope_of(usage(org, datetime(2026, 6, 15, tzinfo=IST)), periods) == org
    assert scope_of(usage(org, datetime(2026, 8, 31, 23, tzinfo=IST)), periods) == org
    assert scope_of(usage(org, datetime(2026, 5, 31, 23, tzinfo=IST)), periods) is None
    # the period is the event's, in the event's timezone
    assert scope_of(usage(org, datetime(2026, 5, 31, 20, tzinfo=UTC)), periods) == org


def test_an_entry_naming_an_organisation_blocks_it() -> None:
    project = Project.create(uuid4(), uuid4(), "p", AT)
    assert scope_of(project.pending_events[0], []) == project.organisation_id


def test_a_plan_version_blocks_its_subscribers_and_a_meter_blocks_everyone() -> None:
    plan = Plan.publish("gold", "Gold", "INR", Decimal(10), Decimal(0), [], set(), AT)
    assert scope_of(plan.pending_events[0], []) == "gold"
    meter = Meter.define("calls", "Calls", "count", None, [], False, AT)
    assert scope_of(meter.pending_events[0], []) is EVERYONE


def test_an_entry_naming_nobody_is_attributed_through_its_aggregate() -> None:
    org = organisation()
    assert scope_of(org.pending_events[0], []) == OwnerOf(org.id, Aggregate)
    invoice_id = uuid4()
    mail = InvoiceMail.record(invoice_id, "invoice", "<m@x>", "a@b.in", 1, AT)
    assert scope_of(mail.pending_events[0], []) == OwnerOf(invoice_id, Invoice)


def test_the_owner_decides_the_scope_and_an_unreadable_owner_blocks_everyone() -> None:
    org = organisation()
    project = Project.create(uuid4(), org.id, "p", AT)
    assert scope_of_owner(org) == org.id
    assert scope_of_owner(project) == org.id
    assert scope_of_owner(Meter.define("gb", "GB", "sum", "gb", [], False, AT)) is EVERYONE
    assert scope_of_owner(None) is EVERYONE


def test_dead_letters_are_gathered_by_scope_and_a_none_scope_blocks_nobody() -> None:
    org = uuid4()
    dead = dead_lettered([("usage_totals", 7, org), ("plans", 8, "gold"), ("catalogue", 9, EVERYONE),
                          ("usage_totals", 10, None), ("usage_totals", 11, org)])
    assert dead == DeadLettered(by_organisation={org: {"usage_totals": [7, 11]}},
                                by_plan_code={"gold": {"plans": [8]}}, everyone={"catalogue": [9]})


def test_an_organisation_is_blocked_by_its_own_entries_its_plans_and_everyones() -> None:
    org, other = uuid4(), uuid4()
    dead = dead_lettered([("usage_totals", 11, org), ("usage_totals", 7, org), ("plans", 8, "gold"),
                          ("plans", 12, "silver"), ("invoices", 5, other)])
    stuck = blocked(org, "Acme", dead, ["gold", "gold"])
    assert stuck == Blocked(org, "Acme", [7, 8, 11], {"plans": [8], "usage_totals": [7, 11]})
    assert blocked(uuid4(), "Clean", dead, ["bronze"]) is None


def test_an_entry_for_everyone_blocks_every_organisation() -> None:
    dead = dead_lettered([("catalogue", 3, EVERYONE)])
    org = uuid4()
    assert blocked(org, "Any", dead, []) == Blocked(org, "Any", [3], {"catalogue": [3]})


def test_an_organisation_whose_subscription_is_dead_lettered_is_still_run() -> None:
    subscribed, lost, elsewhere = uuid4(), uuid4(), uuid4()
    dead = dead_lettered([(PLANS_MODEL, 4, lost), ("usage_totals", 5, elsewhere)])
    assert organisations_to_run([subscribed], dead, PLANS_MODEL) == sorted([subscribed, lost])


# ---- counting ------------------------------------------------------------------------------------


def test_outcomes_are_counted_and_the_blocked_and_failed_named_in_order() -> None:
    ids = [uuid4() for _ in range(8)]
    stuck = Blocked(ids[3], "Stuck", [9], {"plans": [9]})
    done = [Done(ids[0], "created"), Done(ids[1], "created"), Done(ids[2], "existing"),
            Done(ids[3], "blocked", stuck, name="Stuck", reason="b"),
            Done(ids[4], "failed", name="F1", reason="f1"),
            Done(ids[5], "not_due", name="N", reason="n"),
            Done(ids[6], "skipped", name="S", reason="s"),
            Done(ids[7], "failed", name="F2", reason="f2")]
    assert tally("2026-08", done) == RunResult(
        "2026-08", created=2, existing=1, skipped=1, not_due=1, failed=2, blocked=[stuck],
        failed_organisations=[ids[4], ids[7]],
        entries=[RunEntry(ids[3], "Stuck", "blocked", "b"), RunEntry(ids[4], "F1", "failed", "f1"),
                 RunEntry(ids[5], "N", "not_due", "n"), RunEntry(ids[6], "S", "skipped", "s"),
                 RunEntry(ids[7], "F2", "failed", "f2")])


def test_the_listed_organisations_are_bounded_and_the_rest_counted() -> None:
    done = [Done(uuid4(), "skipped", name=f"O{n}", reason="r") for n in range(5)]
    done.insert(1, Done(uuid4(), "created"))  # invoiced ones take no room in the list
    result = tally("2026-08", done, entries_max=3)
    assert [e.name for e in result.entries] == ["O0", "O1", "O2"]
    assert (result.more, result.skipped, result.created) == (2, 5, 1)


def test_not_due_says_when_it_will_be_due_in_the_organisations_timezone() -> None:
    reason = not_due_reason("2026-08", "Asia/Kolkata", timedelta(hours=6))
    assert reason.startswith("not due yet: 2026-08 ends at 2026-09-01T00:00:00+05:30")
    assert reason.endswith("due from 2026-09-01T06:00:00+05:30")


def test_blocked_names_each_read_model_and_its_positions() -> None:
    stuck = Blocked(uuid4(), "Stuck", [4, 9, 12], {"plans": [4, 9], "usage_totals": [12]})
    assert blocked_reason(stuck) == ("blocked by dead-lettered ledger entries: plans at 4, 9; "
                                     "usage_totals at 12; run `billing dlq redrive`")


def test_a_failure_gives_a_domain_errors_message_and_only_the_type_of_any_other() -> None:
    refusal = ValidationFailed([FieldError("period", "bad period")])
    assert failed_reason(refusal) == f"failed: {refusal}"
    assert failed_reason(KeyError("secret internals")) == "failed: KeyError (the log has the details)"


def test_a_run_over_nobody_counts_nothing() -> None:
    assert tally("2026-08", []) == RunResult("2026-08")
