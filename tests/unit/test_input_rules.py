"""The input rules (api/input_rules.py, domain/decimal_text.py, docs/INPUT.md) against plain
references, and the ingestion fast path's cheap checks against the careful path: a body the fast
path accepts breaks no rule, however its keys are repeated, escaped or spaced."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from api.ingest import plain_events
from api.input_rules import (
    JSON_MAX_DEPTH,
    REFUSED_CHARACTERS,
    TOO_DEEP,
    body_problems,
    media_type_problem,
    text_problem,
)
from domain.decimal_text import NotDecimalText, is_decimal_text, parse_decimal_text
from tests.unit.test_ingest_paths import careful, fast

# The meters are test_ingest_paths.RULES': "calls" counts, "total" sums, "disk" is a max of
# its property "gb".


# ---- decimal strings ------------------------------------------------------------------------

def _json_number(text: str) -> bool:
    """The reference: text is one JSON number, nothing around it (msgspec's strict grammar)."""
    if text != text.strip(" \t\r\n"):
        return False
    try:
        msgspec.json.decode(text.encode(), type=Decimal)  # a JSON string is not a bare number
    except (msgspec.DecodeError, UnicodeEncodeError):
        return False
    return not text.startswith('"')


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=12),
                 st.from_regex(r"\A-?[0-9]{1,5}(\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?\Z"),
                 st.decimals(allow_nan=True, allow_infinity=True).map(str)))
@example("\u0661\u0662")
@example("\uff11\uff12")
@example("1_000")
@example("+5")
@example(" 5")
@example("5\n")
@example("NaN")
@example("-0")
@example("01")
@example("1.")
@example("1E400")
@example(".5")
def test_a_decimal_string_is_read_only_when_it_is_a_json_number_in_ascii(text: str) -> None:
    assert is_decimal_text(text) == _json_number(text), text
    if _json_number(text):
        assert parse_decimal_text(text) == Decimal(text)
        assert str(parse_decimal_text(text)) == str(Decimal(text))  # exact, digits and exponent kept
    else:
        with pytest.raises(NotDecimalText):
            parse_decimal_text(text)


def test_a_refused_decimal_string_is_an_arithmetic_error_as_decimal_raises() -> None:
    with pytest.raises(ArithmeticError):
        parse_decimal_text("\uff11")


# ---- characters -----------------------------------------------------------------------------

@given(st.characters())
def test_the_refused_characters_are_c0_but_tab_del_c1_and_surrogates(char: str) -> None:
    code = ord(char)
    refused = (code < 0x20 and char != "\t") or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF
    assert (text_problem(f"a{char}b") is not None) == refused
    assert bool(REFUSED_CHARACTERS.search(char)) == refused


# ---- content types --------------------------------------------------------------------------

@pytest.mark.parametrize(("content_type", "accepted"), [
    (None, True), ("", True), ("application/json", True), ("Application/JSON", True),
    ("application/json; charset=utf-8", True), ("application/json;charset=\"UTF-8\"", True),
    ("application/merge-patch+json", True), ("application/x-www-form-urlencoded", True),
    ("text/plain", False), ("application/xml", False), ("text/json", False),
    ("multipart/form-data; boundary=x", False), ("application/json; charset=latin-1", False),
    ("application/jsonx", False),
])
def test_a_body_is_json_by_content_type(content_type: str | None, accepted: bool) -> None:
    assert (media_type_problem(content_type) is None) == accepted


# ---- nesting --------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(alphabet='[]{}"\\ab,:', max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner, max_size=3)),
    max_leaves=40)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, JSON_MAX_DEPTH + 3), st.booleans())
def test_a_body_is_too_deep_exactly_when_it_nests_beyond_the_limit(
    value: Any, extra: int, spaced: bool
) -> None:
    nested = _nest(value, extra)
    raw = json.dumps(nested, indent=1 if spaced else None).encode()
    assert (TOO_DEEP in body_problems(raw)) == (_depth(nested) > JSON_MAX_DEPTH)


@pytest.mark.parametrize("depth", [JSON_MAX_DEPTH + 1, 900, 1000, 200_000])
def test_deep_nesting_is_named_as_a_problem_of_the_body_without_recursing(depth: int) -> None:
    for raw in (b'{"name": ' + b"[" * depth + b"]" * depth + b"}",
                b'{"a": 1, "a": ' + b"[" * depth + b"]" * depth + b"}"):  # the slow way too
        assert body_problems(raw) == [TOO_DEEP]


# ---- body problems ----------------------------------------------------------------------------

def test_every_problem_of_a_body_is_named_by_its_path() -> None:
    raw = (b'{"name": "a\\u0000", "tiers": [{"up_to": "1"}, {"up_to": "2", "up_to": "3"}],'
           b' "k\\u0007": 1, "meta": {"x": ["ok", "\\ud800"]}}')
    assert [path for path, _ in body_problems(raw)] == [
        "name", "tiers[1].up_to", "k\ufffd", "meta.x[1]"]


def test_a_body_that_is_not_json_is_left_to_the_decoder() -> None:
    assert body_problems(b"name=a") == []
    assert body_problems(b'{"a": "\xff"}') == []  # not UTF-8
    assert body_problems(b"") == []


# ---- the fast path's cheap checks against the careful path -------------------------------------

def _string(text: str, escape: bool) -> str:
    return json.dumps(text, ensure_ascii=escape)


def _obj(pairs: list[tuple[str, str]], sep: str, escape: bool) -> str:
    return "{" + ",".join(f"{_string(k, escape)}{sep}:{sep}{v}" for k, v in pairs) + "}"


keys = st.sampled_from(["region", "user", "a:b", "gb", "metric", "event_id", "value", "events"])
texts = st.one_of(st.sampled_from(["in", "us", "1", "2.5", "x:y", ":", "metric", '"value"', "a\\b"]),
                  st.text(max_size=4))


@st.composite
def event_texts(draw: st.DrawFn, index: int, escape: bool, sep: str) -> str:
    props = draw(st.lists(st.tuples(keys, texts.map(lambda t: _string(t, escape))), max_size=4,
                          unique_by=lambda kv: kv[0]))
    if props and draw(st.integers(0, 3)) == 0:  # repeat a property, now and then
        props.append((draw(st.sampled_from(props))[0], draw(texts.map(lambda t: _string(t, escape)))))
    fields = [("event_id", _string(f"e{index}", escape)),
              ("metric", _string(draw(st.sampled_from(["calls", "total", "disk"])), escape))]
    if draw(st.booleans()):
        fields.append(("value", draw(st.sampled_from(["1", "2.5", '"3"', '"\\u0033"', "null", '"+1"']))))
    if draw(st.booleans()):
        fields.append(("timestamp", '"2026-11-20T11:00:00+00:00"'))
    if len(props) > 0 or draw(st.booleans()):
        fields.append(("properties", _obj(props, sep, escape)))
    if draw(st.integers(0, 3)) == 0:  # repeat one of its fields, now and then
        fields.append(draw(st.sampled_from(fields)))
    draw(st.randoms()).shuffle(fields)
    return _obj(fields, sep, escape)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    escape = draw(st.booleans())
    sep = draw(st.sampled_from(["", " ", "\n"]))
    events = [draw(event_texts(i, escape, sep)) for i in range(draw(st.integers(1, 3)))]
    if len(events) == 1 and draw(st.booleans()):
        return events[0].encode()
    envelope = [("events", "[" + ",".join(events) + "]")]
    if draw(st.integers(0, 7)) == 0:
        envelope.append(("events", "[]"))
    return _obj(envelope, sep, escape).encode()


def _duplicates(body: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in items}) < len(items)
        return dict(items)

    json.loads(body, object_pairs_hook=pairs)
    return found


@settings(max_examples=600, deadline=None)
@given(bodies())
@example(b'{"event_id": "a", "metric": "calls", "event_id": "b"}')
@example(b'{"events": [{"event_id": "b", "metric": "x"}], "events": [{"event_id": "a", "metric": "calls"}]}')
@example(b'{"event_id": "a", "metric": "calls", "properties": {"region": "a:b", "region" : "c"}}')
@example(b'{"event_id": "a", "metric": "calls", "properties": {"user": ":", "user": "x", "region": "y"}}')
@example(b'{"event_id": "a", "metric": "calls", "timestamp": null, "timestamp": null}')
@example(b'{"event_id": "a", "metric": "calls", "\\u0065vent_id": "b"}')
@example(b'{"event_id": "a", "metric": "calls", "properties": {"r": "\\u003a", "r": "\\u003a"}}')
@example(b'{"event_id": "a", "metric": "total", "value": "\\u0031", "value": 2}')
@example(b'{"event_id": "a\\\\", "metric": "calls", "event_id": "b"}')
@example(b'{"event_id": "a\\"", "metric": "calls", "properties": {"r": "\\"", "r": "x"}}')
@example(b'{"event_id": "a\\\\\\"", "metric": "calls", "value": 1, "value": 2}')
@example(b'{"event_id": "a", "metric": "calls", "properties": {}, "properties": {}}')
@example(b'{"event_id": "a\\\\", "metric": "calls", "value": 1, "value": 2, "properties": {"r": "x\\\\"}}')
def test_the_fast_path_never_accepts_a_repeated_key(body: bytes) -> None:
    repeated = _duplicates(body)
    quick, slow = fast(body), careful(body)
    event("a repeated key" if repeated else "fast path accepted" if quick else "left to the careful path")
    if repeated:
        assert quick is None, body
        assert slow is None, body
    elif quick is not None:
        assert slow is not None, body
        assert quick.event_ids == slow.event_ids and list(map(str, quick.values)) == list(
            map(str, slow.values)) and list(quick.properties) == list(slow.properties)


@pytest.mark.parametrize("char", ["\u007f", "\u0080", "\u0085", "\u009f"])
def test_raw_del_and_c1_in_a_body_leave_the_fast_path_and_are_refused(char: str) -> None:
    body = json.dumps({"event_id": "a", "metric": "calls", "properties": {"region": f"x{char}"}},
                      ensure_ascii=False).encode()
    assert b"\\" not in body
    assert plain_events(body) is None
    assert careful(body) is None


def test_raw_control_bytes_are_invalid_json_for_msgspec() -> None:
    """What lets a body without a backslash skip the walk: a raw C0 byte cannot be in a string."""
    for code in [*range(0x20)]:
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(b'{"a": "x' + bytes([code]) + b'"}')


def test_an_ordinary_batch_still_takes_the_fast_path_with_every_kind_of_value() -> None:
    events = [{"event_id": f"e{i}", "metric": "total", "value": v, "properties": {"region": "in", "t": "a:b"}}
              for i, v in enumerate([1, 2.5, "3", "4.25", None, "1e3"])]
    body = json.dumps({"events": events}).encode()
    accepted = fast(body)
    assert accepted is not None
    assert list(map(str, accepted.values)) == ["1", "2.5", "3", "4.25", "1", "1E+3"]


@pytest.mark.parametrize(("text", "plain"), [("12", True), ("-0.0035", True), ("0", True), ("1e3", False),
                                              ("1E-2", False), ("1.5e0", False), ("007", False)])
def test_a_plain_decimal_string_has_no_exponent(text: str, plain: bool) -> None:
    assert is_decimal_text(text, exponent=False) == plain
    assert is_decimal_text(text) == (text != "007")


def test_a_plans_cursor_that_decodes_to_a_control_character_is_a_422_not_a_database_error() -> None:
    from api.plans import decode_code_cursor
    from domain.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="cursor"):
        decode_code_cursor("AA")  # base64 of "\x00": Postgres text cannot hold it
