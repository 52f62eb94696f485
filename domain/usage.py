"""Usage events: the rules an incoming event must meet (docs/API.md, docs/METERING.md), its ledger identity
and the ledger event it becomes, and the reference fold of events into a period quantity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import (
    Clamped,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
    Subnormal,
    localcontext,
)
from functools import lru_cache
from hashlib import sha1
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.decimal_text import parse_decimal_text
from domain.errors import Problems

EVENT_ID_MAX_CHARS = 128
PROPERTIES_MAX_BYTES = 4096
PROPERTY_KEY_MAX_CHARS = 64
PROPERTY_VALUE_MAX_CHARS = 256
PROPERTIES_MAX_KEYS = 64
VALUE_MAX_DIGITS = 18
# The aggregations whose quantity is made of the events' values. A meter of one of these with a
# `field` takes each event's value from that property instead of `value` (docs/METERING.md).
VALUED_AGGREGATIONS = frozenset({"sum", "max", "latest"})
LATE_WINDOW = timedelta(days=35)
FUTURE_WINDOW = timedelta(minutes=5)
_USAGE_NAMESPACE = UUID("0b6f8d8e-6a49-4e7e-9a8e-27c0c55d1c11")
_ONE = Decimal(1)


# RFC 4122 version 5: the version nibble and the variant bits of a SHA-1 based UUID, as the
# bytes to AND and to OR with the first 16 bytes of the digest.
_VERSION_VARIANT_CLEAR = bytes.fromhex("ffffffffffff0fff3fffffffffffffff")
_VERSION_5_VARIANT_RFC = bytes.fromhex("00000000000050008000000000000000")
UUID_BYTES = 16


def usage_id(project_id: UUID, event_id: str) -> UUID:
    """Idempotency by construction: the same (project, event_id) is the same ledger identity."""
    return uuid5(_USAGE_NAMESPACE, f"{project_id}/{event_id}")


def usage_ids(project_id: UUID, event_ids: Iterable[str]) -> list[UUID]:
    """`usage_id` for many events of one project, at a third of the cost: the project's part of
    the name is encoded once. Equal to uuid5, bit for bit."""
    return [UUID(bytes=b) for b in usage_id_bytes(project_id, event_ids)]


@lru_cache(maxsize=4096)
def _name_prefix(project_id: UUID) -> bytes:
    return _USAGE_NAMESPACE.bytes + f"{project_id}/".encode()


def usage_id_bytes(project_id: UUID, event_ids: Iterable[str]) -> list[bytes]:
    """The 16 bytes of each `usage_id`, without making UUID objects (the hot path of ingestion:
    the ledger takes the bytes as they are). The version and variant bits are set in all of
    them at once, as one integer: a third less per id than an integer each."""
    prefix = _name_prefix(project_id)
    digests = b"".join([sha1(prefix + e.encode()).digest()[:UUID_BYTES] for e in event_ids])
    count = len(digests) // UUID_BYTES
    clear, set_ = _masks(count)
    packed = ((int.from_bytes(digests) & clear) | set_).to_bytes(len(digests))
    return [packed[i:i + UUID_BYTES] for i in range(0, len(digests), UUID_BYTES)]


@lru_cache(maxsize=64)
def _masks(count: int) -> tuple[int, int]:
    """The version/variant masks for `count` ids side by side (a batch holds 1 to 1000)."""
    return int.from_bytes(_VERSION_VARIANT_CLEAR * count), int.from_bytes(_VERSION_5_VARIANT_RFC * count)


class Usage(Aggregate):
    """One usage event. Never changes after it is recorded."""

    class Recorded(Aggregate.Created):
        organisation_id: UUID
        project_id: UUID
        event_id: str
        metric: str
        value: Decimal
        occurred_at: datetime
        timezone: str
        properties: dict[str, str]


@dataclass(frozen=True)
class MeterRule:
    """What validation and aggregation need to know about a meter."""

    code: str
    aggregation: str
    field: str | None
    group_by: tuple[str, ...]
    allow_negative: bool

    @property
    def value_field(self) -> str | None:
        """The property each event's value is read from, or None: the value is `value`."""
        return self.field if self.aggregation in VALUED_AGGREGATIONS else None


@dataclass(frozen=True)
class UsageFact:
    """A validated usage event, ready to be recorded."""

    event_id: str
    metric: str
    value: Decimal
    occurred_at: datetime
    properties: dict[str, str]


@dataclass(frozen=True)
class UsageBatch:
    """One request's validated usage, by column: the hot path makes no object per event.
    Equal columns hold the same events as the UsageFacts they could be made of."""

    event_ids: Sequence[str]
    metrics: Sequence[str]
    values: Sequence[Decimal]
    occurred_at: Sequence[datetime]
    properties: Sequence[dict[str, str]]

    def __post_init__(self) -> None:
        n = len(self.event_ids)
        assert all(len(c) == n for c in (self.metrics, self.values, self.occurred_at, self.properties))

    def __len__(self) -> int:
        return len(self.event_ids)

    @classmethod
    def of(cls, facts: Sequence[UsageFact]) -> UsageBatch:
        return cls([f.event_id for f in facts], [f.metric for f in facts], [f.value for f in facts],
                   [f.occurred_at for f in facts], [f.properties for f in facts])


def canonical(value: Any) -> str | None:
    """Property values are kept as exact strings: numbers in their decimal form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, Decimal) and value.is_finite():
        return str(value)
    return None


def significant_digits(value: Decimal) -> int:
    """Digits of a finite value without its trailing zeros, counted exactly (normalize() would
    round to the context's 28 digits first, and overflow on a huge exponent)."""
    return len("".join(map(str, value.as_tuple().digits)).rstrip("0"))


def _check_value(value: Decimal, meter: MeterRule | None, problems: Problems, index: int,
                 name: str = "value") -> None:
    """The value rules, for `value` or the property `name` a meter reads its value from."""
    if not value.is_finite():
        problems.add(name, "must be a finite number", index)
        return
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite value's
    if value == 0:
        # A zero's exponent is still a scale Postgres must hold ("0E+9999999999" is not).
        if not -2 * VALUE_MAX_DIGITS <= exponent <= VALUE_MAX_DIGITS:
            problems.add(name, "a zero's exponent must lie within -36..18", index)
    elif (significant_digits(value) > VALUE_MAX_DIGITS
          or not -VALUE_MAX_DIGITS <= value.adjusted() < VALUE_MAX_DIGITS):
        problems.add(name, f"at most {VALUE_MAX_DIGITS} significant digits, below 1e18", index)
    if value < 0 and not (meter and meter.allow_negative):
        problems.add(name, "must not be negative for this meter", index)


def _field_value(
    meter: MeterRule, field: str, sent: Mapping[str, Any], props: Mapping[str, str],
    problems: Problems, index: int,
) -> Decimal:
    """The value of an event of a meter with a value field: the property, checked like `value`.
    What it returns for an event with a problem is never recorded (the event is refused)."""
    name = f"properties.{field}"
    text = props.get(field)
    if text is None:
        if field not in sent:  # else the property broke a rule of its own, already named
            problems.add(name, f"is required: this {meter.aggregation} meter's value", index)
        return _ONE
    try:
        amount = parse_decimal_text(text)
    except ArithmeticError:
        problems.add(name, "must be a number or decimal string (the meter's value)", index)
        return _ONE
    _check_value(amount, meter, problems, index, name)
    return amount


def _check_properties(
    properties: Mapping[str, Any], size: int, problems: Problems, index: int
) -> dict[str, str]:
    out: dict[str, str] = {}
    if size > PROPERTIES_MAX_BYTES or len(properties) > PROPERTIES_MAX_KEYS:
        problems.add("properties", f"at most {PROPERTIES_MAX_BYTES} bytes and "
                     f"{PROPERTIES_MAX_KEYS} keys", index)
        return out
    for key, value in properties.items():
        text = canonical(value)
        if not key or len(key) > PROPERTY_KEY_MAX_CHARS:
            problems.add(f"properties.{key[:64]}", "keys are 1-64 characters", index)
        elif text is None:
            problems.add(f"properties.{key}", "must be a string, number or boolean", index)
        elif len(text) > PROPERTY_VALUE_MAX_CHARS:
            problems.add(f"properties.{key}", f"at most {PROPERTY_VALUE_MAX_CHARS} characters", index)
        else:
            out[key] = text
    return out


def check_usage(
    *,
    index: int,
    event_id: str,
    metric: str,
    timestamp: datetime | None,
    value: Decimal | None,
    properties: Mapping[str, Any] | None,
    properties_size: int,
    meters: Mapping[str, MeterRule],
    now: datetime,
    problems: Problems,
) -> UsageFact | None:
    """Validate one event against every rule; add each broken rule to `problems`."""
    before = len(problems.errors)
    if not 1 <= len(event_id) <= EVENT_ID_MAX_CHARS:
        problems.add("event_id", f"1-{EVENT_ID_MAX_CHARS} characters", index)
    meter = meters.get(metric)
    if meter is None:
        problems.add("metric", f"no meter is defined with code {metric[:64]!r}", index)
    occurred = now if timestamp is None else timestamp
    if occurred.tzinfo is None or occurred.utcoffset() is None:
        problems.add("timestamp", "must be RFC 3339 with an offset", index)
    elif occurred < now - LATE_WINDOW:
        problems.add("timestamp", "is more than 35 days in the past; too late to bill", index)
    elif occurred > now + FUTURE_WINDOW:
        problems.add("timestamp", "is more than 5 minutes in the future", index)
    sent = properties or {}
    props = _check_properties(sent, properties_size, problems, index)
    field = None if meter is None else meter.value_field
    if field is None:
        amount = Decimal(1) if value is None else value
        _check_value(amount, meter, problems, index)
    else:
        assert meter is not None
        if value is not None:  # two values, one of them ignored: refused, not guessed at
            problems.add("value", f"this meter takes its value from properties.{field}; "
                         "send it there only", index)
        amount = _field_value(meter, field, sent, props, problems, index)
    if meter is not None and meter.aggregation == "unique_count" and meter.field not in props:
        problems.add(f"properties.{meter.field}", "is required by this unique_count meter", index)
    if len(problems.errors) > before:
        return None
    return UsageFact(event_id, metric, amount, occurred, props)


# Checks a value against every value rule at once: rounding to VALUE_MAX_DIGITS significant
# digits must be exact (Inexact), and the exponent must lie in [-18, 18) (Subnormal, Overflow);
# a zero whose exponent does not fit is Clamped (then check_usage decides).
_VALUE_RULES = Context(prec=VALUE_MAX_DIGITS, Emax=VALUE_MAX_DIGITS - 1, Emin=-VALUE_MAX_DIGITS,
                       traps=[InvalidOperation, Inexact, Overflow, Subnormal, Clamped])
# Sums of usage values are exact: valid values span 36 digits (18 significant, exponents -36..17)
# and the default context keeps 28. Enough for sums of billions of them; a sum that would not
# fit raises (Inexact) instead of rounding.
USAGE_EXACT_DIGITS = 80
USAGE_EXACT = Context(prec=USAGE_EXACT_DIGITS, traps=[InvalidOperation, Inexact, Overflow])


def accept_plain_batch(
    metrics: Sequence[str],
    timestamps: Sequence[datetime | None],
    values: Sequence[Decimal | None],
    properties: Sequence[dict[str, str]],
    meters: Mapping[str, MeterRule],
    now: datetime,
) -> tuple[list[datetime], list[Decimal]] | None:
    """The bulk check of the hot path, for events whose shape the caller already checked (event
    ids 1-128 characters, aware timestamps, properties within their limits and made canonical):
    their times and amounts when every event plainly meets every other rule, else None — then
    `check_usage` must look at each event and name what is wrong. It may say None for a valid
    batch (a negative correction, say); it never accepts what `check_usage` would refuse.

    Events of a meter with a value field take their amounts from that property; only they make
    a Decimal each (a meter without one costs a check per meter, not per event)."""
    codes = set(metrics)
    if not meters.keys() >= codes:
        return None
    occurred = [now if t is None else t for t in timestamps]
    if occurred and (min(occurred) < now - LATE_WINDOW or max(occurred) > now + FUTURE_WINDOW):
        return None
    if not _plainly_valid([v for v in values if v is not None]):
        return None
    amounts = [_ONE if v is None else v for v in values]
    for code in codes:
        rule = meters[code]
        if rule.field is None:
            continue
        if rule.aggregation == "unique_count":
            if any(rule.field not in p for m, p in zip(metrics, properties, strict=True) if m == code):
                return None
            continue
        field = rule.value_field
        if field is None:
            continue  # a count meter defined with a field before that was refused: not read
        at = [i for i, m in enumerate(metrics) if m == code]
        if any(values[i] is not None for i in at):
            return None  # `value` beside the field: refused
        try:
            taken = [parse_decimal_text(properties[i][field]) for i in at]
        except (KeyError, ArithmeticError):  # without the property, or not a number
            return None
        if not _plainly_valid(taken):
            return None
        for i, amount in zip(at, taken, strict=True):
            amounts[i] = amount
    return occurred, amounts


def _plainly_valid(given: Sequence[Decimal]) -> bool:
    """Every value meets every value rule and is not negative (a negative one may be valid, for
    a meter that allows corrections: check_usage decides)."""
    try:
        if given and not (all(map(Decimal.is_finite, given)) and min(given) >= 0):
            return False
        for _ in map(_VALUE_RULES.plus, given):
            pass
    except ArithmeticError:  # a rule's signal (decimal's errors are ArithmeticErrors)
        return False
    return True


# ---- the reference fold: what a period's quantity is, straight from the events ----------

def fold(aggregation: str, field: str | None, events: Iterable[tuple[int, Usage.Recorded]]) -> Decimal:
    """Quantity of one period from (ledger position, event) pairs of distinct events."""
    items = list(events)
    if aggregation == "count":
        return Decimal(len(items))
    if aggregation == "sum":
        with localcontext(USAGE_EXACT):
            return sum((e.value for _, e in items), Decimal(0))
    if aggregation == "max":
        return max((e.value for _, e in items), default=Decimal(0))
    if aggregation == "unique_count":
        assert field is not None
        # An event without the field (ordered after its meter became unique_count) adds none.
        return Decimal(len({e.properties[field] for _, e in items if field in e.properties}))
    if aggregation == "latest":
        if not items:
            return Decimal(0)
        return max(items, key=lambda pe: (pe[1].occurred_at, pe[0]))[1].value
    raise ValueError(f"unknown aggregation {aggregation}")
