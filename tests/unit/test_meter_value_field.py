"""A meter's `field` (issue 14, defect 6): a sum, max or latest meter with a field takes each
event's value from `properties[field]`, checked like `value`; an event without it, with a bad
one, or with a `value` beside it is refused by name; a count meter takes no field. Both ways of
validating ingestion say so (docs/METERING.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from api.ingest import accept_plain, check_carefully, decode_carefully, plain_events
from domain.errors import Conflict, Problems, ValidationFailed
from domain.meter import Meter, meter_id
from domain.usage import MeterRule, UsageBatch, check_usage

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = {
    "storage": MeterRule("storage", "max", "gb", (), False),
    "credit": MeterRule("credit", "sum", "amount", (), True),
    "seats": MeterRule("seats", "latest", "n", (), False),
    "calls": MeterRule("calls", "count", None, (), False),
}


def careful(events: list[dict[str, Any]]) -> UsageBatch | list[tuple[int | None, str]]:
    """The careful path's batch, or the (index, field) of each error it names."""
    problems = Problems()
    body = json.dumps({"events": events}).encode()
    try:
        return check_carefully(decode_carefully(body, problems), RULES, NOW, problems)
    except ValidationFailed as e:
        return [(err.index, err.field) for err in e.errors]


def fast(events: list[dict[str, Any]]) -> UsageBatch | None:
    plain = plain_events(json.dumps({"events": events}).encode())
    assert plain is not None
    return accept_plain(plain, RULES, NOW)


def ev(metric: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"e-{metric}-{json.dumps(fields, sort_keys=True)}", "metric": metric} | fields


@pytest.mark.parametrize(("metric", "props", "expected"), [
    ("storage", {"gb": "42.5"}, "42.5"),
    ("storage", {"gb": 7}, "7"),
    ("storage", {"gb": "0.000"}, "0.000"),
    ("credit", {"amount": "1e17"}, "1E+17"),
    ("seats", {"n": "12", "region": "in"}, "12"),
])
def test_a_meter_with_a_field_records_the_property_as_the_value_on_both_paths(
    metric: str, props: dict[str, Any], expected: str
) -> None:
    events = [ev(metric, properties=props)]
    accepted = fast(events)
    checked = careful(events)
    assert isinstance(checked, UsageBatch), checked
    assert accepted is not None, "an ordinary event of a field meter takes the fast path"
    assert [str(v) for v in checked.values] == [expected]
    assert [str(v) for v in accepted.values] == [expected]
    assert checked.properties == accepted.properties  # the property itself is kept as sent


def test_a_json_fraction_in_the_field_is_taken_exactly_by_the_careful_path() -> None:
    body = b'{"event_id": "f", "metric": "storage", "properties": {"gb": 42.50}}'
    plain = plain_events(body)
    assert plain is None or accept_plain(plain, RULES, NOW) is None  # floats go the careful way
    problems = Problems()
    checked = check_carefully(decode_carefully(body, problems), RULES, NOW, problems)
    assert [str(v) for v in checked.values] == ["42.50"]


def test_a_negative_property_is_a_correction_only_where_the_meter_allows_negatives() -> None:
    checked = careful([ev("credit", properties={"amount": "-2.5"})])
    assert isinstance(checked, UsageBatch) and checked.values == [Decimal("-2.5")]
    assert careful([ev("storage", properties={"gb": "-1"})]) == [(0, "properties.gb")]


@pytest.mark.parametrize(("case", "props"), [
    ("missing", {"other": "1"}),
    ("no properties at all", None),
    ("not a number", {"gb": "abc"}),
    ("empty", {"gb": ""}),
    ("a boolean", {"gb": True}),
    ("too large", {"gb": "1e30"}),
    ("too many digits", {"gb": "1234567890123456789"}),
    ("not finite", {"gb": "NaN"}),
    ("infinite", {"gb": "-Infinity"}),
    ("negative", {"gb": "-0.5"}),
    ("a zero Postgres cannot hold", {"gb": "0E+9999999999"}),
    ("an exponent no decimal holds", {"gb": "1e999999999999999999999"}),
])
def test_an_event_without_a_valid_field_value_is_refused_by_name_and_index(
    case: str, props: dict[str, Any] | None
) -> None:
    bad = ev("storage") | ({} if props is None else {"properties": props})
    events = [ev("storage", properties={"gb": "1"}), bad, ev("calls")]
    assert fast(events) is None, case  # the fast path hands it over
    assert careful(events) == [(1, "properties.gb")], case


def test_a_value_beside_a_field_is_refused_not_ignored() -> None:
    events = [ev("storage", value=3, properties={"gb": "42.5"})]
    assert fast(events) is None
    assert careful(events) == [(0, "value")]


def test_meters_without_a_field_still_take_value() -> None:
    events = [ev("calls", value="2.5", properties={"gb": "99"})]
    accepted = fast(events)
    assert accepted is not None and accepted.values == [Decimal("2.5")]


def test_check_usage_names_the_field_that_is_missing() -> None:
    problems = Problems()
    fact = check_usage(index=4, event_id="x", metric="seats", timestamp=None, value=None,
                       properties={"m": "1"}, properties_size=9, meters=RULES, now=NOW, problems=problems)
    assert fact is None
    assert [(e.index, e.field) for e in problems.errors] == [(4, "properties.n")]
    assert "required" in problems.errors[0].message


def test_a_count_meter_takes_no_field() -> None:
    with pytest.raises(ValidationFailed) as refused:
        Meter.define("c", "C", "count", "gb", [], False, NOW)
    assert [e.field for e in refused.value.errors] == ["field"]
    for aggregation in ("sum", "max", "latest", "unique_count"):
        Meter.define("c", "C", aggregation, "gb", [], False, NOW)


def test_a_count_meter_defined_with_a_field_before_the_rule_can_still_be_renamed() -> None:
    # Defined before count meters refused a field: its events carry no value of it, and with
    # usage the field cannot be dropped either; a rename must stay possible.
    legacy = Meter._create(Meter.Defined, id=meter_id("old"), timestamp=NOW, code="old", name="Old",
                           aggregation="count", field="gb", group_by=[], allow_negative=False)
    assert legacy.redefine("Renamed", "count", "gb", [], False, True, NOW)
    assert legacy.name == "Renamed"
    with pytest.raises(Conflict):
        legacy.redefine("Renamed", "count", None, [], False, True, NOW)
    with pytest.raises(ValidationFailed):
        legacy.redefine("Renamed", "count", "other", [], False, False, NOW)
