"""POST /api/v1/events: authenticate the project key, validate every event (all errors of a
batch in one 422), append through group commit, answer 202 only after commit.

Two ways to validate, with one outcome. The fast path decodes the whole body in one msgspec call
into structs whose types carry the shape rules (lengths, counts, aware timestamps, property
types), then checks the remaining rules for the batch at once (`accept_plain_batch`): no Python
runs per event but a few list comprehensions. Anything it is unsure of — an error, a float or a
negative value, a null — goes down the careful path, which checks event by event and names every
broken rule; so the fast path only ever accepts what the careful path would accept, the same way.
Both take a sum, max or latest event's value from `properties[field]` when its meter has a field
(docs/METERING.md).

The input rules of api/input_rules.py (docs/INPUT.md) hold on both paths. The careful path
walks the body once (`body_problems`) and names each broken rule with its event's index. The fast
path never parses a body twice: a body without a backslash cannot hold an escaped character and
its raw C0 bytes are invalid JSON already, so only raw DEL and C1 bytes are looked for; with a
backslash, the decoded strings are searched. A repeated key is ruled out by counting the body's
strings from its quotes against the strings decoded (`_no_repeated_key`).
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from decimal import Decimal
from itertools import repeat
from operator import is_not
from typing import Annotated, Any

import msgspec
from litestar import Request, post
from litestar.openapi import ResponseSpec

from api.client_ip import allowed, client_ip
from api.credentials import authenticate_key
from api.deps import ApiDeps, Deps
from api.input_rules import (
    INPUT_RULES_OPT,
    OWN_BODY_RULES,
    RAW_REFUSED_BYTES,
    REFUSED_ESCAPES,
    TOO_DEEP,
    body_problems,
    require_json_body,
)
from api.problems import BadRequest, Forbidden, TooManyRequests, field_error
from api.read_your_writes import LEDGER_POSITION_HEADER
from domain.decimal_text import DECIMAL_TEXT, NotDecimalText, parse_decimal_text
from domain.errors import FieldError, Problems, ValidationFailed
from domain.records import KeyRecord
from domain.usage import (
    EVENT_ID_MAX_CHARS,
    PROPERTIES_MAX_BYTES,
    PROPERTIES_MAX_KEYS,
    PROPERTY_KEY_MAX_CHARS,
    PROPERTY_VALUE_MAX_CHARS,
    MeterRule,
    UsageBatch,
    UsageFact,
    accept_plain_batch,
    canonical,
    check_usage,
)

REQUEST_EVENTS_MAX = 1000
INGEST_DESCRIPTION = (
    "The body is one event or {\"events\": [...]} with 1 to 1000 of them; each event has"
    " event_id (1-128 characters, unique per project), metric (a meter's code), and optionally"
    " timestamp (RFC 3339 with offset), value (a number, or a decimal string written as a JSON"
    " number in ASCII digits; default 1) and"
    " properties (an object of string, number or boolean values, at most 4 KiB). For a sum,"
    " max or latest meter with a field, the value is properties[field] instead (a number or"
    " decimal string, required, and value must not be sent). No string may hold a control"
    " character (tab excepted) or a lone surrogate; no object may repeat a key. A resent"
    " event_id is a duplicate and changes nothing. 422 lists every invalid event by index;"
    " 413 over 1 MiB; 415 for a body that is not JSON by Content-Type; 429 when rate limited;"
    " 503 when the ledger cannot commit.")
_NULL = msgspec.Raw(b"null")
_NO_PROPERTIES = msgspec.Raw(b"{}")


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str
    metric: str
    timestamp: datetime | None = None
    # Raw: a number is read exactly, a string by the strict grammar (domain/decimal_text.py).
    value: msgspec.Raw = _NULL
    # Raw: its size is checked as sent, and its numbers decoded exactly (see _properties).
    properties: msgspec.Raw = msgspec.Raw(b"null")


# ---- the fast path's shapes: every rule a type can carry --------------------------------------
_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=PROPERTY_KEY_MAX_CHARS)]
_Text = Annotated[str, msgspec.Meta(max_length=PROPERTY_VALUE_MAX_CHARS)]
_TextProperties = Annotated[dict[_Key, _Text], msgspec.Meta(max_length=PROPERTIES_MAX_KEYS)]
# Integers and booleans are made canonical strings afterwards; floats take the careful path
# (it decodes them as exact Decimals).
_AnyProperties = Annotated[dict[_Key, _Text | int | bool], msgspec.Meta(max_length=PROPERTIES_MAX_KEYS)]


# Untracked by the garbage collector (gc=False): a batch decodes a thousand, none holds a cycle.
class PlainEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_ID_MAX_CHARS)]
    metric: str
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    value: msgspec.Raw = _NULL  # decoded afterwards, all at once (plain_values)
    properties: msgspec.Raw = _NO_PROPERTIES  # its size is a rule: decoded afterwards


class PlainBatch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[PlainEvent], msgspec.Meta(min_length=1, max_length=REQUEST_EVENTS_MAX)]


_plain_batch = msgspec.json.Decoder(PlainBatch)
_plain_event = msgspec.json.Decoder(PlainEvent)
_text_properties = msgspec.json.Decoder(list[_TextProperties])
_any_properties = msgspec.json.Decoder(list[_AnyProperties])
# The values of a batch: JSON numbers (exact Decimals; JSON's grammar is ASCII digits) or null.
_number_values = msgspec.json.Decoder(list[Decimal | None])
# When some are strings: each string is then read by the strict grammar, numbers as above.
_mixed_values = msgspec.json.Decoder(list[Any], float_hook=Decimal)
# A run of backslashes and the quote after it: the quote is escaped when the run is odd.
_BACKSLASHES_QUOTE = re.compile(rb'\\+"')
# The values of a batch when every string among them is a JSON number (then read as numbers).
_NUMBER = DECIMAL_TEXT.pattern.encode()  # the one grammar (domain/decimal_text.py), as bytes
_QUOTED_NUMBERS = re.compile(rb"\[(?:(?:%s|\"%s\"|null),)*(?:%s|\"%s\"|null)\]" % ((_NUMBER,) * 4))


class Accepted(msgspec.Struct):
    accepted: int
    duplicates: int


class AcceptedResponse:
    """The 202 as a bare ASGI response: the hot path of ingestion skips Litestar's response
    machinery (headers encoded once, two sends). Documented as `Accepted` in the schema."""

    __slots__ = ("body", "headers")

    def __init__(self, accepted: Accepted, headers: dict[str, str]) -> None:
        self.body = _encoder.encode(accepted)
        self.headers = [(b"content-type", b"application/json"),
                        (b"content-length", str(len(self.body)).encode()),
                        *((k.lower().encode(), v.encode()) for k, v in headers.items())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


_envelope = msgspec.json.Decoder(dict[str, msgspec.Raw])
_items = msgspec.json.Decoder(list[msgspec.Raw])
_event = msgspec.json.Decoder(EventIn)
# JSON floats in properties become exact Decimals (a property may hold a billed value).
_properties = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
_encoder = msgspec.json.Encoder()


async def authorise_key(
    request: Request[Any, Any, Any], deps: ApiDeps
) -> tuple[KeyRecord, dict[str, str]]:
    """Authenticate the key, check its organisation and addresses, and take one request from
    its rate limit. Returns the key and the RateLimit headers for the answer."""
    record = await authenticate_key(request, deps)
    if record.suspended:
        raise Forbidden("the organisation is suspended; usage is not accepted")
    ip = client_ip(request, deps.trusted_proxies)
    if not (allowed(ip, record.organisation_allowed_ips) and allowed(ip, record.allowed_ips)):
        raise Forbidden(f"requests from {ip} are not allowed for this key")
    ok, remaining, retry_s = await deps.rate_limiter.take(
        record.rate_key, record.rate_per_s, record.rate_burst)
    headers = {
        "RateLimit-Limit": str(record.rate_burst),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(math.ceil(retry_s)),
    }
    if not ok:
        raise TooManyRequests(headers | {"Retry-After": str(max(1, math.ceil(retry_s)))})
    return record, headers


def split_body(body: bytes) -> tuple[list[msgspec.Raw], bool]:
    """One event, or {"events": [...]} with 1..1000 of them; and whether it was a batch."""
    try:
        envelope = _envelope.decode(body)
    except msgspec.ValidationError:
        raise ValidationFailed([FieldError("body", "must be an event or {\"events\": [...]}")]) from None
    if "events" not in envelope:
        return [msgspec.Raw(body)], False
    if len(envelope) != 1:
        raise ValidationFailed([FieldError("body", "a batch has only the field \"events\"")])
    try:
        items = _items.decode(envelope["events"])
    except msgspec.ValidationError:
        raise ValidationFailed([FieldError("events", "must be an array of events")]) from None
    if not 1 <= len(items) <= REQUEST_EVENTS_MAX:
        raise ValidationFailed([FieldError("events", f"must hold 1 to {REQUEST_EVENTS_MAX} events")])
    return items, True


class PlainEvents(list[PlainEvent]):
    """The fast path's events, and what the cheap input-rule checks need of the body."""

    body: bytes
    batch: bool  # {"events": [...]}, not one event
    escaped: bool  # the body holds a backslash: an escape may hide any character


def plain_events(body: bytes) -> PlainEvents | None:
    """The body's events when it is a well-shaped event or batch; None sends it the careful way.

    Without a backslash no string can hold an escaped character, and raw C0 bytes are invalid
    JSON (msgspec refuses them), so only raw DEL and C1 bytes, which JSON allows, are looked for
    here; with one, the escapes that could stand for a refused character are (REFUSED_ESCAPES;
    a lone surrogate msgspec refuses itself)."""
    escaped = b"\\" in body
    if escaped and REFUSED_ESCAPES.search(body):
        return None
    if b"\x7f" in body or (b"\xc2" in body and RAW_REFUSED_BYTES.search(body)):
        return None
    decoders = (_plain_batch, _plain_event) if b'"events"' in body[:64] else (_plain_event, _plain_batch)
    for decoder in decoders:
        try:
            decoded = decoder.decode(body)
        except (msgspec.DecodeError, RecursionError):  # validation errors too; deep nesting
            continue
        events = PlainEvents(decoded.events if isinstance(decoded, PlainBatch) else [decoded])
        events.body, events.batch, events.escaped = body, isinstance(decoded, PlainBatch), escaped
        return events
    return None


def _strings_sent(events: PlainEvents) -> int:
    """How many JSON strings (keys and values) the body holds, from its quotes: two each, less
    the escaped ones (a backslash-quote after an even run of backslashes is a string's end)."""
    body = events.body
    quotes = body.count(b'"')
    if events.escaped and b'\\"' in body:
        quotes -= sum(len(run) % 2 == 0 for run in _BACKSLASHES_QUOTE.findall(body))
    return quotes // 2


def _no_repeated_key(events: PlainEvents, timestamps: list[datetime | None], inner: int) -> bool:
    """Whether no object in the body repeats a key, without parsing it again: the strings it
    holds (counted from its quotes) equal the strings of what was decoded. A repeated key is an
    extra string, with its value's strings; what was decoded counts every string it holds, or
    fewer (an explicit `"timestamp": null` is not counted): any difference sends the body the
    careful way, which names what is repeated. `inner`: the strings of the events' values and
    properties, their keys included (plain_values, plain_properties)."""
    count = len(events)
    decoded = (
        (1 if events.batch else 0)  # "events"
        + 4 * count  # "event_id": "...", "metric": "..."
        + 2 * (count - timestamps.count(None))  # "timestamp": "..."
        + inner
    )
    return _strings_sent(events) == decoded


def plain_values(events: list[PlainEvent]) -> tuple[list[Decimal | None], int] | None:
    """Every event's `value`, decoded in one call: a JSON number exactly (its grammar is ASCII
    digits), a string by the strict grammar of domain/decimal_text.py, null or absent as None;
    and the strings of the `value` fields sent (keys and values). None when any is something
    else (the careful path names it)."""
    raws = [e.value for e in events]
    strings = sum(map(is_not, raws, repeat(_NULL)))  # the keys sent
    if not strings:
        return [None] * len(raws), 0  # no event sent a value: each is 1
    joined = b"[" + b",".join(raws) + b"]"
    try:
        if b'"' not in joined:
            return _number_values.decode(joined), strings
        if _QUOTED_NUMBERS.fullmatch(joined):  # each string a JSON number: read as one
            return _number_values.decode(joined.replace(b'"', b"")), strings + joined.count(b'"') // 2
        mixed = _mixed_values.decode(joined)
    except (msgspec.DecodeError, RecursionError):
        return None
    values: list[Decimal | None] = []
    for value in mixed:
        if isinstance(value, str):
            try:
                values.append(parse_decimal_text(value))
            except NotDecimalText:
                return None
            strings += 1
        elif value is None or isinstance(value, Decimal):
            values.append(value)
        elif type(value) is int:
            values.append(Decimal(value))
        else:
            return None  # a boolean, an array, an object
    return values, strings


def plain_properties(events: list[PlainEvent]) -> tuple[list[dict[str, str]], int] | None:
    """Every event's properties, canonical, decoded in one call, and the strings of the
    `properties` fields sent (their keys, and the keys and string values inside); None unless
    all are within their rules (an object of at most 4 KiB as sent, keys and values within
    their limits)."""
    raws = [e.properties for e in events]
    if max(map(len, raws)) > PROPERTIES_MAX_BYTES:
        return None
    joined = b"[" + b",".join(raws) + b"]"
    strings = sum(map(is_not, raws, repeat(_NO_PROPERTIES)))  # the keys sent
    try:
        texts_only = _text_properties.decode(joined)
    except (msgspec.DecodeError, RecursionError):
        pass
    else:
        return texts_only, strings + 2 * sum(map(len, texts_only))
    try:
        decoded = _any_properties.decode(joined)
    except (msgspec.DecodeError, RecursionError):
        return None
    out = []
    for props in decoded:
        strings += len(props) + sum(type(v) is str for v in props.values())
        texts = {k: canonical(v) or "" for k, v in props.items()}  # str, int or bool: never None
        if any(len(v) > PROPERTY_VALUE_MAX_CHARS for v in texts.values()):
            return None  # a very long integer
        out.append(texts)
    return out, strings


def accept_plain(
    events: PlainEvents, rules: dict[str, MeterRule], now: datetime
) -> UsageBatch | None:
    """The whole batch, validated at once; None when any event needs a closer look."""
    decoded = plain_properties(events)
    if decoded is None:
        return None
    properties, property_strings = decoded
    valued = plain_values(events)
    if valued is None:
        return None
    values, value_strings = valued
    timestamps = [e.timestamp for e in events]
    if not _no_repeated_key(events, timestamps, value_strings + property_strings):
        return None
    metrics = [e.metric for e in events]
    accepted = accept_plain_batch(metrics, timestamps, values, properties, rules, now)
    if accepted is None:
        return None
    occurred, amounts = accepted
    return UsageBatch([e.event_id for e in events], metrics, amounts, occurred, properties)


# (index, event, its value, its properties, their size)
Decoded = tuple[int, EventIn, Decimal | None, Any, int]
_one_value = msgspec.json.Decoder(Any, float_hook=Decimal)
VALUE_RULE = "must be a number, or a decimal string written as a JSON number in ASCII digits"


def event_value(raw: msgspec.Raw) -> Decimal | None:
    """An event's `value` as sent: a JSON number exactly, a decimal string by the strict
    grammar, null as None; raises ValueError for anything else."""
    value: object = _one_value.decode(raw)
    if isinstance(value, str):
        try:
            return parse_decimal_text(value)
        except NotDecimalText:
            raise ValueError(value) from None
    if value is None or isinstance(value, Decimal):
        return value
    if type(value) is int:
        return Decimal(value)
    raise ValueError(value)


def decode_events(items: list[msgspec.Raw], problems: Problems,
                  skip: frozenset[int] = frozenset()) -> list[Decoded]:
    """Each event's fields, or its problems; the events at `skip` broke an input rule already."""
    decoded = []
    for index, raw in enumerate(items):
        if index in skip:
            continue
        try:
            event = _event.decode(raw)
        except msgspec.ValidationError as e:
            problems.errors.append(field_error(str(e), index))
            continue
        try:
            value = event_value(event.value)
        except ValueError:
            problems.add("value", VALUE_RULE, index)
            value = None  # the event is refused; its other rules are still checked
        raw_props = bytes(event.properties)
        try:
            props = None if raw_props in (b"null", b"") else _properties.decode(raw_props)
        except msgspec.ValidationError:
            problems.add("properties", "must be an object of string, number or boolean values", index)
            continue
        if props is not None and not isinstance(props, dict):
            problems.add("properties", "must be an object", index)
            continue
        size = len(raw_props) if props is not None else 0
        decoded.append((index, event, value, props, size))
    return decoded


@post("/api/v1/events", summary="Record usage events (one, or up to 1000 in a batch)",
      status_code=202, description=INGEST_DESCRIPTION,
      responses={202: ResponseSpec(Accepted, description="Every accepted event is committed"
                                   " in the ledger; X-Ledger-Position names the position to wait"
                                   " for")},
      opt={INPUT_RULES_OPT: OWN_BODY_RULES})  # the body's input rules are applied here, cheaply
async def ingest(request: Request[Any, Any, Any], deps: Deps) -> AcceptedResponse:
    key, limit_headers = await authorise_key(request, deps)
    require_json_body(request)
    body = await request.body()
    now = deps.clock()
    plain = plain_events(body)
    batch = None
    if plain is not None:
        batch = accept_plain(plain, await deps.meters.rules({e.metric for e in plain}), now)
    if batch is None:
        batch = await check_each(body, deps, now)
    appended = await deps.usage.record(key, batch, now)
    return AcceptedResponse(Accepted(appended.accepted, appended.duplicates),
                            {LEDGER_POSITION_HEADER: str(appended.position), **limit_headers})


async def check_each(body: bytes, deps: ApiDeps, now: datetime) -> UsageBatch:
    """The careful path: every event on its own, every broken rule named (422), or the batch."""
    problems = Problems()
    decoded = decode_carefully(body, problems)
    rules = await deps.meters.rules({e.metric for _, e, _, _, _ in decoded})
    return check_carefully(decoded, rules, now, problems)


_EVENT_PATH = re.compile(r"events\[(\d+)\](?:\.(.*))?", re.DOTALL)


def decode_carefully(body: bytes, problems: Problems) -> list[Decoded]:
    """Every event decoded, or its problems added; the input rules first (api/input_rules.py):
    nesting, duplicate keys, refused characters, each named with its event's index."""
    found = body_problems(body)
    if TOO_DEEP in found:  # before msgspec, which would recurse as deep
        raise ValidationFailed([FieldError(*TOO_DEEP)])
    try:
        items, batch = split_body(body)
    except msgspec.DecodeError:
        if found:  # e.g. a lone surrogate: JSON, but not text msgspec will decode
            raise ValidationFailed(located(found, any(p.startswith("events") for p, _ in found))) from None
        raise BadRequest("the body is not valid JSON") from None
    errors = located(found, batch)
    if any(e.index is None for e in errors):  # the envelope itself: nothing else to look at
        raise ValidationFailed(errors)
    problems.errors.extend(errors)
    return decode_events(items, problems, frozenset(e.index for e in errors if e.index is not None))


def located(found: list[tuple[str, str]], batch: bool) -> list[FieldError]:
    """Input-rule problems at JSON paths as the field errors of ingestion: a batch's
    `events[3].properties.region` is `properties.region` of the event at index 3; a single
    event's fields are at index 0."""
    errors = []
    for path, message in found:
        at = _EVENT_PATH.fullmatch(path) if batch else None
        if at is not None:
            errors.append(FieldError(at.group(2) or "event", message, int(at.group(1))))
        else:
            errors.append(FieldError(path, message, None if batch else 0))
    return errors


def check_carefully(
    decoded: list[Decoded], rules: dict[str, MeterRule], now: datetime, problems: Problems
) -> UsageBatch:
    facts: list[UsageFact] = []
    for index, event, value, props, size in decoded:
        fact = check_usage(index=index, event_id=event.event_id, metric=event.metric,
                           timestamp=event.timestamp, value=value, properties=props, properties_size=size,
                           meters=rules, now=now, problems=problems)
        if fact is not None:
            facts.append(fact)
    if problems.errors:
        problems.errors.sort(key=lambda e: (e.index or 0))
        problems.raise_if_any()
    return UsageBatch.of(facts)
