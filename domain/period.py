"""Billing periods: calendar months ('YYYY-MM') in an organisation's timezone. Parsing and
validating a period, its bounds as UTC instants, the period of an instant, shifting by months,
whether a period has ended (for one timezone, or anywhere), the periods due for a run, and the
label a document prints. Nothing else in the code defines what a period is."""

from __future__ import annotations

import functools
import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from domain.errors import FieldError, ValidationFailed

MONTHS_PER_YEAR = 12
# Billing periods since the Unix epoch, and far enough ahead that the month after a period and
# any timezone's view of its bounds stay inside the calendar.
PERIOD_YEAR_MIN = 1970
PERIOD_YEAR_MAX = 9998
_PERIOD = re.compile(r"^([0-9]{4})-([0-9]{2})$")  # ASCII digits only: \d takes any script's
# English month names, whatever the process's locale.
MONTH_NAMES = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
# The time zone where a month ends first (UTC+14): until then it has ended for nobody.
EARLIEST_ZONE = "Pacific/Kiritimati"
# Periods (and period, timezone pairs) whose parse and bounds are kept: an invoice run asks for
# the same few thousands of times. Pure functions of their text, so a cache is exact.
PERIODS_CACHED_MAX = 4096


@functools.lru_cache(maxsize=PERIODS_CACHED_MAX)
def parse_period(period: str) -> tuple[int, int]:
    """'YYYY-MM' -> (year, month); ValidationFailed (field `period`) for anything else."""
    match = _PERIOD.match(period)
    if not match or not 1 <= int(match.group(2)) <= MONTHS_PER_YEAR:
        raise ValidationFailed([FieldError("period", "must be a month written YYYY-MM, e.g. 2026-10")])
    if not PERIOD_YEAR_MIN <= int(match.group(1)) <= PERIOD_YEAR_MAX:
        raise ValidationFailed([FieldError(
            "period", f"must be a month of the years {PERIOD_YEAR_MIN} to {PERIOD_YEAR_MAX}")])
    return int(match.group(1)), int(match.group(2))


def _month_start(year: int, month: int, zone: ZoneInfo) -> datetime:
    return datetime(year, month, 1, tzinfo=zone).astimezone(UTC)


def _following(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == MONTHS_PER_YEAR else (year, month + 1)


@functools.lru_cache(maxsize=PERIODS_CACHED_MAX)
def period_bounds(period: str, timezone: str) -> tuple[datetime, datetime]:
    """[start, end) of a period in `timezone`, as UTC instants."""
    year, month = parse_period(period)
    zone = ZoneInfo(timezone)
    return _month_start(year, month, zone), _month_start(*_following(year, month), zone)


def first_day(period: str) -> date:
    """The period's first calendar day (how usage totals key a month)."""
    return date(*parse_period(period), 1)


def is_period(text: str) -> bool:
    """True when `text` is a period parse_period accepts."""
    try:
        parse_period(text)
    except ValidationFailed:
        return False
    return True


def period_has_ended(period: str, timezone: str, now: datetime) -> bool:
    """True once the period ('YYYY-MM' in `timezone`) is over at `now`."""
    return now >= period_bounds(period, timezone)[1]


def check_period_has_ended_somewhere(period: str, now: datetime) -> None:
    """ValidationFailed (field `period`) unless `period` has ended in at least one time zone:
    an invoice run for a month still under way anywhere-first is a mistake, not "not due"."""
    end = period_bounds(period, EARLIEST_ZONE)[1]
    if now < end:
        raise ValidationFailed([FieldError(
            "period", f"{period} has not ended yet (the earliest it ends anywhere is "
                      f"{end.isoformat()}); it can be invoiced after that")])


def period_of(instant: datetime, timezone: str) -> str:
    """The 'YYYY-MM' period that contains `instant` in `timezone`."""
    local = instant.astimezone(ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}"


def period_start(instant: datetime, timezone: str) -> datetime:
    """The start (UTC) of the period that contains `instant`."""
    return period_bounds(period_of(instant, timezone), timezone)[0]


def next_period_start(instant: datetime, timezone: str) -> datetime:
    """The start (UTC) of the period after the one that contains `instant`."""
    return period_bounds(period_of(instant, timezone), timezone)[1]


def period_start_at_or_after(instant: datetime, timezone: str) -> datetime:
    """`instant` itself if a period starts exactly then, else the next period's start."""
    start = period_start(instant, timezone)
    return start if start == instant else next_period_start(instant, timezone)


def shift_period(period: str, months: int) -> str:
    """The period `months` after `period` (before it, when negative)."""
    year, month = parse_period(period)
    index = year * 12 + (month - 1) + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def due_periods(now: datetime, grace: timedelta, count: int) -> list[str]:
    """The last `count` calendar months that ended at least `grace` ago (UTC calendar; the run
    checks each organisation's own timezone)."""
    periods: list[str] = []
    at = now - grace
    year, month = at.year, at.month
    for _ in range(count):
        month -= 1
        if month == 0:
            year, month = year - 1, 12
        periods.append(f"{year:04d}-{month:02d}")
    return periods


def period_label(period: str) -> str:
    """'2026-10' -> 'October 2026'."""
    year, month = parse_period(period)
    return f"{MONTH_NAMES[month - 1]} {year}"


def local_day(at: datetime, timezone: str) -> date:
    """The calendar day of `at` in `timezone` (a daily bucket)."""
    return at.astimezone(ZoneInfo(timezone)).date()


def month_of(day: date) -> date:
    """The first day of `day`'s month: the monthly bucket a daily one belongs to."""
    return day.replace(day=1)


def month_after(day: date) -> date:
    """The first day of the month after `day`'s."""
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)

