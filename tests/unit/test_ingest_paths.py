"""The two ways of validating ingestion agree: whatever body the fast path accepts, the careful
path accepts too, as the same events encoded to the same ledger bytes; whatever the careful path
refuses, the fast path hands over to it instead of accepting. That holds for meters with a
`field` too, whose events' values are the property's (docs/METERING.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import uuid4

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from adapters.usage_writer import encode_batch
from api.ingest import accept_plain, check_carefully, decode_carefully, plain_events
from domain.errors import Problems, ValidationFailed
from domain.records import KeyRecord
from domain.usage import MeterRule, UsageBatch

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = {
    "calls": MeterRule("calls", "count", None, (), False),
    "total": MeterRule("total", "sum", None, (), True),
    "peak": MeterRule("peak", "max", None, ("region",), False),
    "users": MeterRule("users", "unique_count", "user", (), False),
    # Meters whose value is a property's (issue 14, defect 6).
    "disk": MeterRule("disk", "max", "gb", ("region",), False),
    "credit": MeterRule("credit", "sum", "amount", (), True),
    "level": MeterRule("level", "latest", "gb", (), False),
}
FIELD_METERS = sorted(code for code, rule in RULES.items()
                      if rule.field is not None and rule.aggregation != "unique_count")
KEY = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
MISSING = object()

texts = st.text(st.characters(codec="utf-8"), max_size=8)  # the codec leaves out surrogates


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four: most events then meet every rule but one, or all of them."""
    return st.one_of(valid, valid, valid, wild)


event_ids = mostly(st.text(min_size=1, max_size=8),
                   st.one_of(texts, st.text(min_size=126, max_size=130), st.integers(0, 9)))
moments = mostly(
    st.integers(-35 * 24 * 60 + 1, 4).map(lambda m: (NOW + timedelta(minutes=m)).isoformat()),
    st.one_of(
        st.integers(-40 * 24 * 60, 10).map(lambda m: (NOW + timedelta(minutes=m)).isoformat()),
        st.sampled_from([
            (NOW - timedelta(days=35)).isoformat(), (NOW + timedelta(minutes=5)).isoformat(),
            (NOW - timedelta(days=35, seconds=1)).isoformat(),
            (NOW + timedelta(minutes=5, microseconds=1)).isoformat(),
            NOW.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
            "2026-11-20T12:00:00", "yesterday", "2026-11-20T12:00:00.123456789+05:30"]),
        st.integers(0, 10**10), st.none()),
)
values = mostly(
    st.one_of(st.integers(0, 10**6), st.decimals(0, 10**6, places=3).map(str)),
    st.one_of(
        st.integers(-5, 10**19),
        st.decimals(allow_nan=True, allow_infinity=True, places=None).map(str),
        st.sampled_from(["1e17", "1e18", "9.99999999999999999e17", "1e-18", "1e-19", "0E-40", "-0",
                         "0.000000000000000001", "123456789012345678", "1234567890123456789",
                         "1.00000000000000000000", "12.5", "abc", "NaN", "-Infinity", "",
                         "0E+9999999999", "0E+18", "0E-36", "0E-37", "1e999999999999",
                         "1.00000000000000000000000000001"]),
        st.floats(allow_nan=False, allow_infinity=False, width=32), st.none(), st.booleans()),
)
property_values = mostly(
    st.one_of(st.text(max_size=3), st.integers(-10**6, 10**6), st.booleans()),
    st.one_of(st.text(min_size=255, max_size=258), st.sampled_from([256, -255, 257, 300]).map(
                  lambda d: 10**d - 1 if d > 0 else -(10 ** -d)),
              st.floats(allow_nan=False, allow_infinity=False), st.none(),
              st.lists(st.integers(), max_size=1)),
)
# What a field meter's property may hold: valid numbers mostly, else the value rules' edges.
field_values = mostly(
    st.one_of(st.integers(0, 10**6), st.decimals(0, 10**6, places=3).map(str)),
    st.one_of(st.sampled_from(["1e17", "1e18", "9.99999999999999999e17", "1e-19", "0E-40", "-0",
                               "-2.5", "1234567890123456789", "1e30", "abc", "NaN", "-Infinity",
                               "", " 42 ", "1_000", "0E+9999999999", "1e999999999999999999999"]),
              st.integers(-5, 10**19), st.floats(allow_nan=False, allow_infinity=False, width=32),
              st.booleans(), st.none()),
)
field_properties = mostly(  # both meters' fields, so that most field events are plain
    st.fixed_dictionaries({"gb": field_values, "amount": field_values},
                          optional={"region": st.sampled_from(["in", "us"])}),
    st.one_of(st.dictionaries(st.sampled_from(["gb", "amount", "user"]), property_values, max_size=3),
              st.none()),
)
properties = mostly(
    st.dictionaries(st.sampled_from(["user", "region", "path", "gb"]), property_values, max_size=3),
    st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(["user", ""]), texts,
                                  st.text(min_size=63, max_size=66)), property_values, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=3), st.just(250).map(lambda n: "v" * n), min_size=17,
                        max_size=18),
        st.none(), st.integers(), st.lists(st.integers(), max_size=2)),
)
plain_events_ = st.fixed_dictionaries(
    {"event_id": st.text(min_size=1, max_size=8), "metric": st.sampled_from(sorted(RULES))},
    optional={"timestamp": moments, "value": values, "properties": properties},
)
_field_event = {"event_id": st.text(min_size=1, max_size=8), "metric": st.sampled_from(FIELD_METERS),
                "properties": field_properties}
# Deferred: its repr (which hypothesis builds for every strategy made of it) stays short.
field_events = st.deferred(lambda: mostly(  # a `value` beside the field is refused: now and then
    st.fixed_dictionaries(_field_event, optional={"timestamp": moments}),
    st.fixed_dictionaries(_field_event, optional={"timestamp": moments, "value": values}),
))
wild_events = st.fixed_dictionaries(
    {"event_id": event_ids, "metric": mostly(st.sampled_from(sorted(RULES)), st.just("unknown"))},
    optional={"timestamp": moments, "value": values, "properties": properties,
              "extra": st.integers()},
)
events = st.one_of(plain_events_, plain_events_, field_events, field_events, wild_events)
bodies = st.one_of(
    events,
    st.fixed_dictionaries({"events": st.lists(events, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"events": st.lists(events, min_size=0, max_size=6)}),
    st.fixed_dictionaries({"events": st.lists(events, min_size=1, max_size=3), "other": st.none()}),
)


def careful(body: bytes) -> UsageBatch | None:
    """The careful path's batch, or None when it refuses the body."""
    problems = Problems()
    try:
        return check_carefully(decode_carefully(body, problems), RULES, NOW, problems)
    except ValidationFailed:
        return None
    except Exception as e:  # a 400 for JSON that is not valid
        assert type(e).__name__ == "BadRequest", e
        return None


def fast(body: bytes) -> UsageBatch | None:
    plain = plain_events(body)
    return None if plain is None else accept_plain(plain, RULES, NOW)


def _as_tuples(batch: UsageBatch) -> list[tuple[Any, ...]]:
    return [(e, m, str(v), t, list(p.items())) for e, m, v, t, p in zip(
        batch.event_ids, batch.metrics, batch.values, batch.occurred_at, batch.properties,
        strict=True)]


@settings(max_examples=600, deadline=None)
@given(body=bodies)
@example(body={"events": [{"event_id": "a", "metric": "calls"}]})
@example(body={"event_id": "a", "metric": "total", "value": -3})
@example(body={"event_id": "a", "metric": "users", "properties": {"region": "x"}})
@example(body={"event_id": "a", "metric": "disk", "properties": {"gb": "42.5"}})
@example(body={"event_id": "a", "metric": "disk", "value": "3", "properties": {"gb": "42.5"}})
@example(body={"event_id": "a", "metric": "credit", "properties": {"gb": "42.5"}})
@example(body={"event_id": "a", "metric": "level", "properties": {"gb": "abc"}})
@example(body={"events": [{"event_id": "a", "metric": "credit", "properties": {"amount": "-1"}},
                          {"event_id": "b", "metric": "disk", "properties": {"gb": 7}}]})
def test_what_the_fast_path_accepts_the_careful_path_accepts_the_same_way(body: Any) -> None:
    raw = json.dumps(body).encode()
    accepted = fast(raw)
    event("fast path" if accepted is not None else "careful path")
    if accepted is None:
        expected_ = careful(raw)
        if expected_ is not None:  # the careful path accepted what the fast path handed over
            _values_come_from_fields(expected_)
        return
    expected = careful(raw)
    assert expected is not None, f"the fast path accepted what the careful path refuses: {raw!r}"
    assert _as_tuples(accepted) == _as_tuples(expected)
    assert encode_batch(KEY, accepted, NOW) == encode_batch(KEY, expected, NOW)
    _values_come_from_fields(accepted)


def _values_come_from_fields(batch: UsageBatch) -> None:
    """A field meter's event holds its property's value, never `value` (nor the default 1)."""
    for metric, value, props in zip(batch.metrics, batch.values, batch.properties, strict=True):
        if metric in FIELD_METERS:
            field = RULES[metric].field
            assert field is not None
            event("a field meter's event accepted")
            assert str(value) == str(Decimal(props[field])), (metric, value, props)


def test_an_ordinary_batch_takes_the_fast_path() -> None:
    body = json.dumps({"events": [
        {"event_id": f"e{i}", "metric": "peak", "value": i, "properties": {"region": "in", "n": 7,
                                                                          "ok": False}}
        for i in range(1000)]}).encode()
    accepted = fast(body)
    assert accepted is not None and len(accepted) == 1000
    assert accepted.properties[0] == {"region": "in", "n": "7", "ok": "false"}
    assert accepted.occurred_at[0] == NOW and accepted.values[3] == Decimal(3)
    assert _as_tuples(accepted) == _as_tuples(careful(body))  # type: ignore[arg-type]


def test_a_single_event_takes_the_fast_path_too() -> None:
    accepted = fast(b'{"event_id": "x", "metric": "calls", "timestamp": "2026-11-20T17:30:00+05:30"}')
    assert accepted is not None and accepted.occurred_at == [NOW] and accepted.values == [Decimal(1)]


def test_a_property_sent_twice_is_refused_either_way() -> None:
    # Issue 20: a repeated key is refused (docs/INPUT.md), no longer read as its last value.
    body = b'{"event_id": "x", "metric": "peak", "properties": {"a": "1", "region": "in", "a": 2}}'
    assert fast(body) is None and careful(body) is None
