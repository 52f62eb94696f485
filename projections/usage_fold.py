"""The usage totals' fold, in memory: a batch of usage events (views or whole events) into
count, sum, max, latest and distinct values per organisation, project, meter, group and local
day and month. projections/usage_totals.py writes what it gives and keeps the meters' rules."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from operator import itemgetter
from typing import Any
from uuid import UUID

import msgspec

from domain.period import local_day, month_of
from domain.usage import USAGE_EXACT, MeterRule, Usage

Bucket = tuple[UUID, UUID, str, str, date, str]
# While folding a batch: (organisation, project, metric, group key, local day). Months are
# merged from days when the batch is written.
DayKey = tuple[UUID, UUID, str, str, date]
Unique = tuple[UUID, UUID, str, str, date, str, str]  # a bucket and one distinct value
HOUR_S = 3600


@dataclass
class Totals:
    group_values: dict[str, str]
    count: int = 0
    sum: Decimal = Decimal(0)
    max: Decimal | None = None
    latest: tuple[datetime, int, Decimal] | None = None

    def add(self, values: Sequence[Decimal | str], at: datetime, position: int,
            value: Decimal | str) -> None:
        """Events at one moment `at`: their values (Decimals, or as the ledger holds them: see
        UsageView), and the position and value of the last."""
        self.count += len(values)
        total, top = _sum_and_max(values)
        with localcontext(USAGE_EXACT):
            self.sum += total
        self.max = top if self.max is None else max(self.max, top)
        if self.latest is None or (at, position) > self.latest[:2]:
            self.latest = (at, position, Decimal(value))

    def merge(self, other: Totals) -> None:
        self.count += other.count
        with localcontext(USAGE_EXACT):
            self.sum += other.sum
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        if other.latest is not None and (self.latest is None or other.latest[:2] > self.latest[:2]):
            self.latest = other.latest


def _all_digits(values: Sequence[Decimal | str]) -> bool:
    if type(values[0]) is not str:
        return False
    try:  # one join and two checks, not a Python step per value
        joined = "".join(values)  # type: ignore[arg-type]
    except TypeError:  # some are Decimals (whole events and views in one run)
        return False
    return joined.isascii() and joined.isdigit()  # 0-9 only: what int() and Decimal() agree on


def _sum_and_max(values: Sequence[Decimal | str]) -> tuple[Decimal, Decimal]:
    """The exact sum and the maximum. Values that are all whole numbers written as digits (the
    usual usage: counts, bytes) are added as ints, at a fraction of a Decimal's cost: the same
    Decimal results, as a Decimal of a whole number has exponent 0 either way."""
    if _all_digits(values):
        whole = list(map(int, values))
        return Decimal(sum(whole)), Decimal(max(whole))
    exact = [v if type(v) is Decimal else Decimal(v) for v in values]
    with localcontext(USAGE_EXACT):
        return sum(exact, Decimal(0)), max(exact)


def group_key(values: dict[str, str]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":")) if values else ""


class UsageView(msgspec.Struct, frozen=True, gc=False):
    """What this model reads of a Usage.Recorded (the projector decodes only this). The ids stay
    16 bytes, the value the string the ledger holds for a Decimal (decoding a Decimal was 60 % of
    the view's cost; whole numbers are then added as ints) and the properties undecoded until a
    meter needs them: the cheapest to decode. The model takes whole events as well (a rebuild
    may hand it those). Untracked by the garbage
    collector (it holds no containers): thousands are decoded at a time."""

    organisation_id: bytes
    project_id: bytes
    metric: str
    value: str
    occurred_at: datetime
    timezone: str
    properties: msgspec.Raw


_properties = msgspec.msgpack.Decoder(dict[str, str])
_last_position = itemgetter(1)
Run = list[tuple[Any, int]]  # (UsageView or Usage.Recorded, position), all at one moment


def _uuid(value: bytes | UUID) -> UUID:
    return value if isinstance(value, UUID) else UUID(bytes=value)


def _props(event: UsageView | Usage.Recorded) -> dict[str, str]:
    props = event.properties
    return props if isinstance(props, dict) else _properties.decode(props)


def _distinct(key: DayKey, events: Run, field: str) -> Iterator[tuple[DayKey, str]]:
    """The distinct values of `field` in these events. Ingestion refuses a unique_count event
    without it, but a meter may have become unique_count (no usage yet) after the API checked an
    event that is ordered after the change: such an event adds no value (domain.usage.fold
    agrees), where a KeyError would dead-letter it and leave its counts out."""
    for e, _ in events:
        value = _props(e).get(field)
        if value is not None:
            yield key, value


_UNKNOWN: Any = object()


class LocalDays:
    """`local_day` of many instants, worked out once per (timezone, UTC hour): every instant of
    an hour has the same local day unless a day starts inside that hour (an offset of :30 or
    :45, or a change of offset), and such an hour asks `local_day` for each instant. Bounded by
    the hours the events span, per timezone."""

    def __init__(self) -> None:
        self.hours: dict[tuple[str, int], date | None] = {}

    def day(self, at: datetime, timezone: str) -> date:
        key = (timezone, int(at.timestamp() // HOUR_S))
        known = self.hours[key] if key in self.hours else self.whole_hour(key)
        return known if known is not None else local_day(at, timezone)

    def whole_hour(self, key: tuple[str, int]) -> date | None:
        """The local day of every instant of that (timezone, UTC hour), or None when a day
        starts inside it; remembered."""
        timezone, hour = key
        start = datetime.fromtimestamp(hour * HOUR_S, UTC)
        first = local_day(start, timezone)
        last = local_day(start + timedelta(seconds=HOUR_S) - timedelta(microseconds=1), timezone)
        known = self.hours[key] = first if first == last else None
        return known


class Fold:
    """One batch's usage, folded before anything is written. Events are first put in runs that
    share organisation, project, meter, moment and timezone — usually few, as a request's events
    tend to share their moment — and the day, the group and the totals are then worked out once
    per run.

    Putting an event in its run must cost little: each event's fields are new objects (just
    decoded), and hashing them first, as a dict key of all five, took ~1.5 µs an event (a
    datetime's first hash alone ~0.8 µs). So an event is compared (==, no hashing) with the one
    before it, usually of the same request; only the meter is looked up, in the few runs of that
    moment. Equal fields give the same run either way: == is what a dict key compares too."""

    def __init__(self) -> None:
        # The runs of one (organisation, project, moment, timezone), by meter.
        self._moments: dict[tuple[Any, ...], dict[str, Run]] = {}
        self.days: dict[DayKey, Totals] = {}
        self.uniques: set[tuple[DayKey, str]] = set()
        self._local_days: dict[tuple[datetime, str], date] = {}
        self._groups: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[dict[str, str], str]] = {}
        self._ids: dict[bytes | UUID, UUID] = {}
        self.local_days = LocalDays()

    @property
    def runs(self) -> dict[tuple[Any, ...], Run]:
        """The runs added and not yet folded, by (organisation, project, meter, moment, timezone)."""
        return {(org, project, metric, at, timezone): run
                for (org, project, at, timezone), by_metric in self._moments.items()
                for metric, run in by_metric.items()}

    def add_all(self, items: Sequence[tuple[Any, int]]) -> None:
        prev: Any = None
        by_metric: dict[str, Run] = {}
        for item in items:
            e = item[0]
            if prev is None or not (e.occurred_at == prev.occurred_at
                                    and e.project_id == prev.project_id
                                    and e.organisation_id == prev.organisation_id
                                    and e.timezone == prev.timezone):
                by_metric = self._moment_of(e)
            prev = e
            run = by_metric.get(e.metric)
            if run is None:
                run = by_metric[e.metric] = []
            run.append(item)

    def _moment_of(self, e: Any) -> dict[str, Run]:
        moment = (e.organisation_id, e.project_id, e.occurred_at, e.timezone)
        by_metric = self._moments.get(moment)
        if by_metric is None:
            by_metric = self._moments[moment] = {}
        return by_metric

    def fold_runs(self, rules: dict[str, MeterRule]) -> None:
        for (org, project, metric, at, timezone), run in self.runs.items():
            rule = rules.get(metric)
            if rule is None:
                raise LookupError(f"usage for unknown meter {metric!r}")
            moment = (at, timezone)
            day = self._local_days.get(moment)
            if day is None:
                day = self._local_days[moment] = local_day(at, timezone)
            ids = self._ids
            org_id = ids.get(org) or ids.setdefault(org, _uuid(org))
            project_id = ids.get(project) or ids.setdefault(project, _uuid(project))
            needs_props = bool(rule.group_by) or rule.aggregation == "unique_count"
            for group_values, events in (self._by_group(run, rule) if needs_props
                                         else (((), run),)):
                known = self._group(group_values, rule)
                key = (org_id, project_id, metric, known[1], day)
                t = self.days.get(key)
                if t is None:
                    t = self.days[key] = Totals(known[0])
                last = max(events, key=_last_position)
                t.add([e.value for e, _ in events], at, last[1], last[0].value)
                if rule.aggregation == "unique_count" and rule.field is not None:
                    self.uniques.update(_distinct(key, events, rule.field))
        self._moments.clear()

    @staticmethod
    def _by_group(run: Run, rule: MeterRule) -> list[tuple[tuple[str, ...], Run]]:
        groups: dict[tuple[str, ...], Run] = {}
        for item in run:
            props = _props(item[0])
            groups.setdefault(tuple(props.get(k, "") for k in rule.group_by), []).append(item)
        return list(groups.items())

    def _group(self, values: tuple[str, ...], rule: MeterRule) -> tuple[dict[str, str], str]:
        cache_key = (rule.group_by, values)
        known = self._groups.get(cache_key)
        if known is None:
            groups = dict(zip(rule.group_by, values, strict=True))
            known = self._groups[cache_key] = (groups, group_key(groups))
        return known

    def add_by_day(self, items: Sequence[tuple[Any, int]], rules: dict[str, MeterRule]) -> None:
        """`add_all` then `fold_runs`, with the same totals, for a long stream whose events seldom
        share their moment (a replay of the ledger): events are put in runs of one organisation,
        project, meter and local day instead, the day found per (timezone, UTC hour) by
        `LocalDays`. Meters with group_by or unique_count (whose values need the properties)
        take the moment runs."""
        hours = self.local_days.hours
        whole_hour = self.local_days.whole_hour
        simple: dict[str, bool] = {}
        runs: dict[tuple[Any, ...], Run] = {}
        others: Run = []
        for item in items:
            e = item[0]
            metric = e.metric
            plain = simple.get(metric)
            if plain is None:
                rule = rules.get(metric)
                if rule is None:
                    raise LookupError(f"usage for unknown meter {metric!r}")
                plain = simple[metric] = not rule.group_by and rule.aggregation != "unique_count"
            if not plain:
                others.append(item)
                continue
            at = e.occurred_at
            hour = (e.timezone, int(at.timestamp() // HOUR_S))  # LocalDays.day, inline
            day = hours.get(hour, _UNKNOWN)
            if day is _UNKNOWN:
                day = whole_hour(hour)
            if day is None:
                day = local_day(at, e.timezone)
            key = (e.organisation_id, e.project_id, metric, day)
            run = runs.get(key)
            if run is None:
                runs[key] = [item]
            else:
                run.append(item)
        ids = self._ids
        for (org, project, metric, day), run in runs.items():
            org_id = ids.get(org) or ids.setdefault(org, _uuid(org))
            project_id = ids.get(project) or ids.setdefault(project, _uuid(project))
            bucket = (org_id, project_id, metric, "", day)
            t = self.days.get(bucket)
            if t is None:
                t = self.days[bucket] = Totals({})
            if len(run) == 1:
                e, position = run[0]
                t.add([e.value], e.occurred_at, position, e.value)
                continue
            # The latest by (moment, position): the run is in position order, so the last of
            # the events at the latest moment.
            moments = [e.occurred_at for e, _ in run]
            latest = max(moments)
            e, position = run[len(moments) - 1 - moments[::-1].index(latest)]
            t.add([e.value for e, _ in run], latest, position, e.value)
        if others:
            self.add_all(others)
            self.fold_runs(rules)

    def pending_meters(self) -> set[str]:
        """The meters of the usage added and not yet folded."""
        return {metric for by_metric in self._moments.values() for metric in by_metric}

    def take(self, rules: dict[str, MeterRule]) -> tuple[dict[Bucket, Totals], set[Unique]]:
        """Everything added so far, folded with these meters' rules into day and month totals
        and distinct values; the fold is empty again afterwards."""
        self.fold_runs(rules)
        totals: dict[Bucket, Totals] = {}
        for (org, project, metric, key, day), t in self.days.items():
            totals[(org, project, metric, "day", day, key)] = t
            month = (org, project, metric, "month", month_of(day), key)
            merged = totals.get(month)
            if merged is None:
                merged = totals[month] = Totals(t.group_values)
            merged.merge(t)
        uniques = {
            (org, project, metric, granularity, start, key, value)
            for (org, project, metric, key, day), value in self.uniques
            for granularity, start in (("day", day), ("month", month_of(day)))
        }
        self.days.clear()
        self.uniques.clear()
        return totals, uniques
