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
"""

from __future__ import annotations

import hmac
import math
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from litestar import Request, post
from litestar.openapi import ResponseSpec

from api.auth import bearer_token
from api.client_ip import allowed, client_ip
from api.deps import ApiDeps
from api.ids import LEDGER_POSITION_HEADER
from api.problems import BadRequest, Forbidden, TooManyRequests, Unauthenticated, field_error
from domain.api_key import secret_hash, split_key
from domain.errors import FieldError, Problems, ValidationFailed
from domain.ports import KeyRecord
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

BATCH_MAX_EVENTS = 1000
INGEST_DESCRIPTION = (
    "The body is one event or {\"events\": [...]} with 1 to 1000 of them; each event has"
    " event_id (1-128 characters, unique per project), metric (a meter's code), and optionally"
    " timestamp (RFC 3339 with offset), value (a number or decimal string; default 1) and"
    " properties (an object of string, number or boolean values, at most 4 KiB). For a sum,"
    " max or latest meter with a field, the value is properties[field] instead (a number or"
    " decimal string, required, and value must not be sent). A resent"
    " event_id is a duplicate and changes nothing. 422 lists every invalid event by index;"
    " 413 over 1 MiB; 429 when rate limited; 503 when the ledger cannot commit.")


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str
    metric: str
    timestamp: datetime | None = None
    value: Decimal | None = None
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
    value: Decimal | None = None
    properties: msgspec.Raw = msgspec.Raw(b"{}")  # its size is a rule: decoded afterwards


class PlainBatch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[PlainEvent], msgspec.Meta(min_length=1, max_length=BATCH_MAX_EVENTS)]


_plain_batch = msgspec.json.Decoder(PlainBatch)
_plain_event = msgspec.json.Decoder(PlainEvent)
_text_properties = msgspec.json.Decoder(list[_TextProperties])
_any_properties = msgspec.json.Decoder(list[_AnyProperties])


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


async def authenticate_key(request: Request[Any, Any, Any], deps: ApiDeps) -> KeyRecord:
    parts = split_key(bearer_token(request))
    record = await deps.keys.find(parts[0]) if parts else None
    if parts is None or record is None:
        raise Unauthenticated("unknown API key")
    if not hmac.compare_digest(secret_hash(parts[1]), record.secret_sha256):
        raise Unauthenticated("unknown API key")
    if record.revoked:
        raise Unauthenticated("this API key has been revoked")
    if record.expires_at is not None and record.expires_at <= deps.clock():
        raise Unauthenticated("this API key has expired")
    return record


def split_body(body: bytes) -> list[msgspec.Raw]:
    """One event, or {"events": [...]} with 1..1000 of them."""
    try:
        envelope = _envelope.decode(body)
    except msgspec.ValidationError:
        raise ValidationFailed([FieldError("body", "must be an event or {\"events\": [...]}")]) from None
    if "events" not in envelope:
        return [msgspec.Raw(body)]
    if len(envelope) != 1:
        raise ValidationFailed([FieldError("body", "a batch has only the field \"events\"")])
    try:
        items = _items.decode(envelope["events"])
    except msgspec.ValidationError:
        raise ValidationFailed([FieldError("events", "must be an array of events")]) from None
    if not 1 <= len(items) <= BATCH_MAX_EVENTS:
        raise ValidationFailed([FieldError("events", f"must hold 1 to {BATCH_MAX_EVENTS} events")])
    return items


def plain_events(body: bytes) -> list[PlainEvent] | None:
    """The body's events when it is a well-shaped event or batch; None sends it the careful way."""
    decoders = (_plain_batch, _plain_event) if b'"events"' in body[:64] else (_plain_event, _plain_batch)
    for decoder in decoders:
        try:
            decoded = decoder.decode(body)
        except msgspec.DecodeError:  # validation errors too
            continue
        return decoded.events if isinstance(decoded, PlainBatch) else [decoded]
    return None


def plain_properties(events: list[PlainEvent]) -> list[dict[str, str]] | None:
    """Every event's properties, canonical, decoded in one call; None unless all are within
    their rules (an object of at most 4 KiB as sent, keys and values within their limits)."""
    raws = [e.properties for e in events]
    if max(map(len, raws)) > PROPERTIES_MAX_BYTES:
        return None
    joined = b"[" + b",".join(raws) + b"]"
    try:
        return _text_properties.decode(joined)
    except msgspec.DecodeError:
        pass
    try:
        decoded = _any_properties.decode(joined)
    except msgspec.DecodeError:
        return None
    out = []
    for props in decoded:
        texts = {k: canonical(v) or "" for k, v in props.items()}  # str, int or bool: never None
        if any(len(v) > PROPERTY_VALUE_MAX_CHARS for v in texts.values()):
            return None  # a very long integer
        out.append(texts)
    return out


def accept_plain(
    events: list[PlainEvent], rules: dict[str, MeterRule], now: datetime
) -> UsageBatch | None:
    """The whole batch, validated at once; None when any event needs a closer look."""
    properties = plain_properties(events)
    if properties is None:
        return None
    metrics = [e.metric for e in events]
    accepted = accept_plain_batch(metrics, [e.timestamp for e in events],
                                  [e.value for e in events], properties, rules, now)
    if accepted is None:
        return None
    occurred, amounts = accepted
    return UsageBatch([e.event_id for e in events], metrics, amounts, occurred, properties)


Decoded = tuple[int, EventIn, Any, int]  # (index, event, properties, properties size)


def decode_events(items: list[msgspec.Raw], problems: Problems) -> list[Decoded]:
    decoded = []
    for index, raw in enumerate(items):
        try:
            event = _event.decode(raw)
        except msgspec.ValidationError as e:
            problems.errors.append(field_error(str(e), index))
            continue
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
        decoded.append((index, event, props, size))
    return decoded


@post("/api/v1/events", summary="Record usage events (one, or up to 1000 in a batch)",
      status_code=202, description=INGEST_DESCRIPTION,
      responses={202: ResponseSpec(Accepted, description="Every accepted event is committed"
                                   " in the ledger; X-Ledger-Position names the position to wait"
                                   " for")})
async def ingest(request: Request[Any, Any, Any]) -> AcceptedResponse:
    deps: ApiDeps = request.app.state.deps
    key, limit_headers = await authorise_key(request, deps)
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
    rules = await deps.meters.rules({e.metric for _, e, _, _ in decoded})
    return check_carefully(decoded, rules, now, problems)


def decode_carefully(body: bytes, problems: Problems) -> list[Decoded]:
    try:
        return decode_events(split_body(body), problems)
    except msgspec.DecodeError:
        raise BadRequest("the body is not valid JSON") from None


def check_carefully(
    decoded: list[Decoded], rules: dict[str, MeterRule], now: datetime, problems: Problems
) -> UsageBatch:
    facts: list[UsageFact] = []
    for index, event, props, size in decoded:
        fact = check_usage(index, event.event_id, event.metric, event.timestamp,
                           event.value, props, size, rules, now, problems)
        if fact is not None:
            facts.append(fact)
    if problems.errors:
        problems.errors.sort(key=lambda e: (e.index or 0))
        problems.raise_if_any()
    return UsageBatch.of(facts)
