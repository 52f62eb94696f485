"""Month buckets from domain/period.py: a day's month and the month after it, for every day."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from domain.period import month_after, month_of

days = st.dates(min_value=date(1, 1, 1), max_value=date(9999, 11, 30))


@given(day=days)
def test_a_days_month_starts_on_the_first_on_or_before_it(day: date) -> None:
    first = month_of(day)
    assert first.day == 1 and (first.year, first.month) == (day.year, day.month)


@given(day=days)
def test_the_month_after_starts_the_day_after_the_months_last_day(day: date) -> None:
    following = month_after(day)
    assert following.day == 1 and following > day
    assert month_of(following - timedelta(days=1)) == month_of(day)
