"""The replay's fold (`Fold.add_by_day`: runs by local day, the day found per timezone and UTC
hour) gives exactly the totals and distinct values of the projector's fold (`add_all` then
`fold_runs`: runs by moment), across day boundaries at :30 and :45 offsets and DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.usage_writer import encode_batch
from domain.period import local_day
from domain.records import KeyRecord
from domain.usage import MeterRule, UsageBatch
from projections.usage_fold import Fold, LocalDays, UsageView

TIMEZONES = ("Asia/Kolkata", "Asia/Kathmandu", "America/New_York", "UTC", "Australia/Lord_Howe")
START = datetime(2026, 3, 1, tzinfo=UTC)
SPAN_MIN = 60 * 24 * 300  # across the year's DST changes
RULES = {"calls": MeterRule("calls", "count", None, (), False),
         "gb": MeterRule("gb", "sum", None, (), False),
         "seats": MeterRule("seats", "max", None, (), False),
         "level": MeterRule("level", "latest", None, (), False),
         "users": MeterRule("users", "unique_count", "user", (), False),
         "region_calls": MeterRule("region_calls", "count", None, ("region",), False)}
KEYS = [KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), tz, None, False) for tz in TIMEZONES]

events = st.lists(st.tuples(
    st.integers(0, len(KEYS) - 1), st.sampled_from(sorted(RULES)),
    st.integers(0, SPAN_MIN), st.sampled_from([Decimal(3), Decimal("2.5"), Decimal(0), Decimal(7)]),
    st.sampled_from(["a", "b"])), min_size=1, max_size=120)


def _views(drawn: list[tuple[int, str, int, Decimal, str]]) -> list[tuple[UsageView, int]]:
    out = []
    decoder = msgspec.msgpack.Decoder(UsageView)
    for position, (k, metric, minute, value, prop) in enumerate(drawn, start=1):
        at = START + timedelta(minutes=minute, seconds=position % 60)
        batch = UsageBatch([f"e{position}"], [metric], [value], [at],
                           [{"user": prop, "region": prop}])
        _, states = encode_batch(KEYS[k], batch, START)
        out.append((decoder.decode(states[0]), position))
    return out


@settings(max_examples=60, deadline=None)
@given(events, st.integers(1, 5))
def test_the_replay_fold_equals_the_projectors_fold(drawn: list[tuple[int, str, int, Decimal, str]],
                                                     pages: int) -> None:
    items = _views(drawn)
    by_moment, by_day = Fold(), Fold()
    by_moment.add_all(items)
    by_moment.fold_runs(RULES)
    size = max(1, len(items) // pages)
    for start in range(0, len(items), size):  # in pages, as the replay reads them
        by_day.add_by_day(items[start:start + size], RULES)
    expected_totals, expected_uniques = by_moment.take(RULES)
    totals, uniques = by_day.take(RULES)
    assert uniques == expected_uniques
    assert totals.keys() == expected_totals.keys()
    for bucket, t in totals.items():
        e = expected_totals[bucket]
        assert (t.count, t.sum, t.max, t.latest, t.group_values) == (
            e.count, e.sum, e.max, e.latest, e.group_values), bucket


def test_local_days_by_hour_agree_with_local_day_minute_by_minute() -> None:
    days = LocalDays()
    for tz in TIMEZONES:
        at = datetime(2026, 10, 24, tzinfo=UTC)
        while at < datetime(2026, 11, 3, tzinfo=UTC):  # Lord Howe's and New York's changes
            assert days.day(at, tz) == local_day(at, tz), (at, tz)
            at += timedelta(minutes=15)
