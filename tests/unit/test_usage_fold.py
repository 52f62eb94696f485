"""The in-memory usage fold's shortcuts give exactly what the plain Decimal fold gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from domain.usage import EXACT, MeterRule
from projections.usage_fold import Fold, Totals, UsageView

# Whole numbers (the ints shortcut) and everything else a ledger value can be.
values = st.one_of(
    st.integers(0, 10**18).map(Decimal),
    st.decimals(allow_nan=False, allow_infinity=False, places=None,
                min_value=Decimal(-(10**18)), max_value=Decimal(10**18)),
    st.sampled_from([Decimal("1E+3"), Decimal("-0"), Decimal("0.000"), Decimal("1.50")]),
)
AT = datetime(2026, 11, 30, 18, 31, tzinfo=UTC)


def _plain(vs: list[Decimal]) -> tuple[int, Decimal, Decimal]:
    with localcontext(EXACT):
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
