"""Instants a client may name (expiries, subscription starts): aware, and inside a span where
moving them to UTC or any time zone, or adding a month, stays inside the calendar."""

from __future__ import annotations

from datetime import UTC, datetime

from domain.errors import FieldError, ValidationFailed

# The same span as billing periods (domain.period PERIOD_YEAR_MIN..MAX), with a day's margin
# on each side for offsets of up to ±23:59.
INSTANT_MIN = datetime(1970, 1, 2, tzinfo=UTC)
INSTANT_MAX = datetime(9998, 12, 30, tzinfo=UTC)


def check_instant(value: datetime | None, field: str) -> None:
    """ValidationFailed naming `field` unless `value` is None or an aware instant in the span.
    Compares the naive wall-clock fields first: an offset at the calendar's edge makes the
    conversion to UTC itself overflow."""
    if value is None:
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationFailed([FieldError(field, "must be an RFC 3339 time with an offset")])
    naive = value.replace(tzinfo=None)
    if not INSTANT_MIN.replace(tzinfo=None) <= naive <= INSTANT_MAX.replace(tzinfo=None):
        raise ValidationFailed([FieldError(
            field, f"must lie between {INSTANT_MIN.date().isoformat()} and "
                   f"{INSTANT_MAX.date().isoformat()}")])
