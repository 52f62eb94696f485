"""The in-memory usage fold's shortcuts give exactly what the plain Decimal fold gives; a
meter with a value field folds the property values that ingestion records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from uuid import uuid4

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from adapters.usage_writer import encode_batch
from domain.errors import Problems
from domain.records import KeyRecord
from domain.usage import USAGE_EXACT, VALUE_MAX_DIGITS, MeterRule, UsageBatch, check_usage, significant_digits
from domain.usage import fold as fold_events
from projections.usage_fold import Fold, Totals, UsageView


def _ledger_holds(value: Decimal) -> bool:
    """What ingestion lets into the ledger: at most VALUE_MAX_DIGITS significant digits, below
    1e18 and not below 1e-18 (a zero's exponent within -36..18). Wider values are not usage."""
    if value == 0:
        exponent = value.as_tuple().exponent
        return isinstance(exponent, int) and -2 * VALUE_MAX_DIGITS <= exponent <= VALUE_MAX_DIGITS
    return (significant_digits(value) <= VALUE_MAX_DIGITS
            and -VALUE_MAX_DIGITS <= value.adjusted() < VALUE_MAX_DIGITS)


# Whole numbers (the ints shortcut) and everything else a ledger value can be.
values = st.one_of(
    st.integers(0, 10**18 - 1).map(Decimal),
    st.decimals(allow_nan=False, allow_infinity=False, places=None,
                min_value=Decimal(-(10**18)), max_value=Decimal(10**18)).filter(_ledger_holds),
    st.sampled_from([Decimal("1E+3"), Decimal("-0"), Decimal("0.000"), Decimal("1.50")]),
)
AT = datetime(2026, 11, 30, 18, 31, tzinfo=UTC)


def _plain(vs: list[Decimal]) -> tuple[int, Decimal, Decimal]:
    with localcontext(USAGE_EXACT):
        return len(vs), sum(vs, Decimal(0)), max(vs)


@given(st.lists(values, min_size=1, max_size=40), st.booleans())
def test_totals_of_values_as_the_ledger_holds_them_equal_the_decimal_fold(
    vs: list[Decimal], mixed: bool
) -> None:
    # As a view decodes them: each Decimal's own string (the ledger's msgpack form).
    held: list[Decimal | str] = [msgspec.msgpack.decode(msgspec.msgpack.encode(v)) for v in vs]
    if mixed:  # whole events and views in one run
        held[0] = vs[0]
    t = Totals({})
    t.add(held, AT, 1, held[-1])
    count, total, top = _plain(vs)
    assert (t.count, t.sum, t.max) == (count, total, top)
    # Not only equal: the same Decimal, digit for digit (what is written to the read model).
    assert (str(t.sum), str(t.max)) == (str(total), str(top))
    assert t.latest is not None and str(t.latest[2]) == str(vs[-1])


def _view(org: bytes, metric: str, at: datetime) -> UsageView:
    return UsageView(org, b"p" * 16, metric, "1", at, "Asia/Kolkata", msgspec.Raw(b"\x80"))


@given(st.lists(st.tuples(st.sampled_from([b"a" * 16, b"b" * 16]), st.sampled_from(["m", "n"]),
                          st.integers(0, 2)), min_size=1, max_size=60))
def test_events_go_to_the_run_of_their_organisation_meter_and_moment_in_any_order(
    shape: list[tuple[bytes, str, int]]
) -> None:
    items = [(_view(org, metric, AT + timedelta(minutes=m)), position)
             for position, (org, metric, m) in enumerate(shape, 1)]
    fold = Fold()
    fold.add_all(items[: len(items) // 2])
    fold.add_all(items[len(items) // 2:])  # a second batch joins the runs of the first
    expected: dict[tuple[object, ...], list[int]] = {}
    for view, position in items:
        key = (view.organisation_id, view.project_id, view.metric, view.occurred_at, view.timezone)
        expected.setdefault(key, []).append(position)
    assert {k: [p for _, p in run] for k, run in fold.runs.items()} == expected
    rules = {m: MeterRule(m, "count", None, (), False) for m in ("m", "n")}
    totals, _ = fold.take(rules)
    assert sum(t.count for (*_, g, _d, _k), t in totals.items() if g == "day") == len(items)


@dataclass(frozen=True)
class _Recorded:
    value: Decimal
    occurred_at: datetime
    properties: dict[str, str]


MID_MONTH = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # its events' minutes share a local month
FIELD_RULES = {a: MeterRule(a, a, "gb", (), a == "sum") for a in ("sum", "max", "latest")}
# " 7 " is no number since issue 20 (docs/INPUT.md): "7.0" stands in for it.
_property_numbers = st.one_of(st.integers(0, 10**6),
                              st.decimals(0, 10**6, places=3).map(str),
                              st.sampled_from(["42.5", "1E+17", "0.000", "1e-18", "7.0"]))


@given(st.sampled_from(sorted(FIELD_RULES)),
       st.lists(st.tuples(_property_numbers, st.integers(0, 3)), min_size=1, max_size=20))
def test_a_field_meters_totals_fold_the_property_values_as_ingestion_records_them(
    aggregation: str, sent: list[tuple[int | str, int]]
) -> None:
    """Ingestion records the property as the event's value (issue 14, defect 6): the usage
    totals' fold and the reference fold then give the quantity of the property values, with no
    change of their own (a rebuild folds the same recorded values)."""
    rule = FIELD_RULES[aggregation]
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    problems = Problems()
    facts = [check_usage(index=i, event_id=f"e{i}", metric=rule.code,
                         timestamp=MID_MONTH - timedelta(minutes=m), value=None, properties={"gb": gb},
                         properties_size=16, meters=FIELD_RULES, now=MID_MONTH,
                         problems=problems) for i, (gb, m) in enumerate(sent)]
    assert not problems.errors, problems.errors
    batch = UsageBatch.of([f for f in facts if f is not None])
    _, states = encode_batch(key, batch, MID_MONTH)
    views = [(msgspec.msgpack.decode(s, type=UsageView), position)
             for position, s in enumerate(states, 1)]
    fold = Fold()
    fold.add_all(views)
    totals, _ = fold.take(FIELD_RULES)
    (month,) = [t for (*_, g, _d, _k), t in totals.items() if g == "month"]
    quantity = {"sum": month.sum, "max": month.max,
                "latest": month.latest[2] if month.latest else None}[aggregation]
    values = [Decimal(str(gb)) for gb, _ in sent]
    recorded = [(p, _Recorded(v, MID_MONTH - timedelta(minutes=m), {"gb": str(gb)}))
                for p, (v, (gb, m)) in enumerate(zip(values, sent, strict=True), 1)]
    expected = fold_events(aggregation, "gb", recorded)  # type: ignore[arg-type]
    assert quantity == expected
    with localcontext(USAGE_EXACT):
        direct = {"sum": sum(values, Decimal(0)), "max": max(values),
                  "latest": max(recorded, key=lambda pr: (pr[1].occurred_at, pr[0]))[1].value}
    assert str(quantity) == str(direct[aggregation])
