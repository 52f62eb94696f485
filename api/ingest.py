"""POST /api/v1/events: authenticate the project key, validate every event (all errors of a
batch in one 422), append through group commit, answer 202 only after commit."""

from __future__ import annotations

import hmac
import math
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar import Request, Response, post

from api.auth import bearer_token
from api.client_ip import allowed, client_ip
from api.deps import ApiDeps
from api.ids import LEDGER_POSITION_HEADER
from api.problems import BadRequest, Forbidden, TooManyRequests, Unauthenticated, field_error
from domain.api_key import secret_hash, split_key
from domain.errors import FieldError, Problems, ValidationFailed
from domain.ports import KeyRecord
from domain.usage import UsageFact, check_usage

BATCH_MAX_EVENTS = 1000


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str
    metric: str
    timestamp: datetime | None = None
    value: Decimal | None = None
    # Raw: its size is checked as sent, and its numbers decoded exactly (see _properties).
    properties: msgspec.Raw = msgspec.Raw(b"null")


class Accepted(msgspec.Struct):
    accepted: int
    duplicates: int


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
        f"key:{record.key_id}", record.rate_per_s, record.rate_burst)
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
      status_code=202)
async def ingest(request: Request[Any, Any, Any]) -> Response[bytes]:
    deps: ApiDeps = request.app.state.deps
    key, limit_headers = await authorise_key(request, deps)
    body = await request.body()
    problems = Problems()
    try:
        decoded = decode_events(split_body(body), problems)
    except msgspec.DecodeError:
        raise BadRequest("the body is not valid JSON") from None
    rules = await deps.meters.rules({e.metric for _, e, _, _ in decoded})
    now = deps.clock()
    facts: list[UsageFact] = []
    for index, event, props, size in decoded:
        fact = check_usage(index, event.event_id, event.metric, event.timestamp,
                           event.value, props, size, rules, now, problems)
        if fact is not None:
            facts.append(fact)
    if problems.errors:
        problems.errors.sort(key=lambda e: (e.index or 0))
        problems.raise_if_any()
    appended = await deps.usage.record(key, facts, now)
    return Response(
        _encoder.encode(Accepted(appended.accepted, appended.duplicates)),
        status_code=202, media_type="application/json",
        headers={LEDGER_POSITION_HEADER: str(appended.position), **limit_headers},
    )
