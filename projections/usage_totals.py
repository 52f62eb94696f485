"""The usage totals read model: per organisation, project, meter, day and month (in the
organisation's timezone) and group_by values — count, sum, max, latest, and the distinct values
behind unique_count (kept exactly, not estimated). Its own copy of meter definitions keeps a
rebuild a pure function of the ledger."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, localcontext
from operator import itemgetter
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.rows import dict_row

from domain.meter import Meter
from domain.usage import EXACT, MeterRule, Usage, local_day
from projections.base import ReadModel

NAME = "usage_totals"
GRANULARITIES = ("day", "month")
QUERY_MAX_ROWS = 10_000

DDL = (
    """CREATE TABLE IF NOT EXISTS usage_meters (
        id uuid PRIMARY KEY,
        code text NOT NULL UNIQUE,
        aggregation text NOT NULL,
        field text,
        group_by text[] NOT NULL,
        allow_negative boolean NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS usage_totals (
        organisation_id uuid NOT NULL,
        project_id uuid NOT NULL,
        metric text NOT NULL,
        granularity text NOT NULL,
        period_start date NOT NULL,
        group_key text NOT NULL,
        group_values jsonb NOT NULL,
        count bigint NOT NULL,
        sum numeric NOT NULL,
        max numeric NOT NULL,
        latest_value numeric NOT NULL,
        latest_at timestamptz NOT NULL,
        latest_position bigint NOT NULL,
        PRIMARY KEY (organisation_id, metric, granularity, period_start, project_id, group_key)
    )""",
    """CREATE TABLE IF NOT EXISTS usage_unique (
        organisation_id uuid NOT NULL,
        project_id uuid NOT NULL,
        metric text NOT NULL,
        granularity text NOT NULL,
        period_start date NOT NULL,
        group_key text NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (organisation_id, metric, granularity, period_start, project_id, group_key, value)
    )""",
)

Bucket = tuple[UUID, UUID, str, str, date, str]
# While folding a batch: (organisation, project, metric, group key, local day). Months are
# merged from days when the batch is written.
DayKey = tuple[UUID, UUID, str, str, date]


@dataclass
class _Totals:
    group_values: dict[str, str]
    count: int = 0
    sum: Decimal = Decimal(0)
    max: Decimal | None = None
    latest: tuple[datetime, int, Decimal] | None = None

    def add(self, values: Sequence[Decimal], at: datetime, position: int, value: Decimal) -> None:
        """Events at one moment `at`: their values, and the position and value of the last."""
        self.count += len(values)
        with localcontext(EXACT):
            self.sum += sum(values, Decimal(0))
        top = max(values)
        self.max = top if self.max is None else max(self.max, top)
        if self.latest is None or (at, position) > self.latest[:2]:
            self.latest = (at, position, value)

    def merge(self, other: _Totals) -> None:
        self.count += other.count
        with localcontext(EXACT):
            self.sum += other.sum
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        if other.latest is not None and (self.latest is None or other.latest[:2] > self.latest[:2]):
            self.latest = other.latest


def group_key(values: dict[str, str]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":")) if values else ""


def _rule(row: Sequence[Any]) -> MeterRule:
    return MeterRule(row[0], row[1], row[2], tuple(row[3]), row[4])


def _noop(cur: Cursor[Any], event: Any, position: int) -> None:
    """Never called: this model applies whole batches (see `_apply_batch`)."""
    raise AssertionError("usage totals apply in batches")


class UsageView(msgspec.Struct, frozen=True, gc=False):
    """What this model reads of a Usage.Recorded (the projector decodes only this). The ids stay
    16 bytes and the properties undecoded until a meter needs them: the cheapest to decode. The
    model takes whole events as well (a rebuild may hand it those). Untracked by the garbage
    collector (it holds no containers): thousands are decoded at a time."""

    organisation_id: bytes
    project_id: bytes
    metric: str
    value: Decimal
    occurred_at: datetime
    timezone: str
    properties: msgspec.Raw


_METER_EVENTS = frozenset({Meter.Defined, Meter.Redefined})
_properties = msgspec.msgpack.Decoder(dict[str, str])
_last_position = itemgetter(1)
Run = list[tuple[Any, int]]  # (UsageView or Usage.Recorded, position), all at one moment


def _uuid(value: bytes | UUID) -> UUID:
    return value if isinstance(value, UUID) else UUID(bytes=value)


def _props(event: UsageView | Usage.Recorded) -> dict[str, str]:
    props = event.properties
    return props if isinstance(props, dict) else _properties.decode(props)


class _Fold:
    """One batch's usage, folded before anything is written. Events are first put in runs that
    share organisation, project, meter, moment and timezone — usually few, as a request's events
    tend to share their moment — with no more per event than a dict lookup; the day, the group
    and the totals are then worked out once per run."""

    def __init__(self) -> None:
        self.runs: dict[tuple[Any, ...], Run] = {}
        self.days: dict[DayKey, _Totals] = {}
        self.uniques: set[tuple[DayKey, str]] = set()
        self._local_days: dict[tuple[datetime, str], date] = {}
        self._groups: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[dict[str, str], str]] = {}
        self._ids: dict[bytes | UUID, UUID] = {}

    def add_all(self, items: Sequence[tuple[Any, int]]) -> None:
        runs = self.runs
        for item in items:
            e = item[0]
            key = (e.organisation_id, e.project_id, e.metric, e.occurred_at, e.timezone)
            run = runs.get(key)
            if run is None:
                runs[key] = [item]
            else:
                run.append(item)

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
                    t = self.days[key] = _Totals(known[0])
                last = max(events, key=_last_position)
                t.add([e.value for e, _ in events], at, last[1], last[0].value)
                if rule.aggregation == "unique_count" and rule.field is not None:
                    self.uniques.update((key, _props(e)[rule.field]) for e, _ in events)
        self.runs.clear()

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

    def flush(self, cur: Cursor[Any], rules: dict[str, MeterRule]) -> None:
        _load_rules(cur, {key[2] for key in self.runs} - rules.keys(), rules)
        self.fold_runs(rules)
        totals: dict[Bucket, _Totals] = {}
        for (org, project, metric, key, day), t in self.days.items():
            totals[(org, project, metric, "day", day, key)] = t
            month = (org, project, metric, "month", day.replace(day=1), key)
            merged = totals.get(month)
            if merged is None:
                merged = totals[month] = _Totals(t.group_values)
            merged.merge(t)
        uniques = {
            (org, project, metric, granularity, start, key, value)
            for (org, project, metric, key, day), value in self.uniques
            for granularity, start in (("day", day), ("month", day.replace(day=1)))
        }
        _flush(cur, totals, uniques)
        self.days.clear()
        self.uniques.clear()


def _apply_batch(cur: Cursor[Any], items: list[tuple[Any, int]]) -> None:
    rules: dict[str, MeterRule] = {}
    fold = _Fold()
    meters = [i for i, item in enumerate(items) if type(item[0]) in _METER_EVENTS]
    start = 0
    for i in meters:  # a meter's definition applies to the usage after it: fold up to there
        fold.add_all(items[start:i])
        fold.flush(cur, rules)
        _upsert_meter(cur, items[i][0])
        rules.clear()
        start = i + 1
    fold.add_all(items[start:])
    fold.flush(cur, rules)


def _upsert_meter(cur: Cursor[Any], e: Any) -> None:
    if isinstance(e, Meter.Defined):
        cur.execute(
            "INSERT INTO usage_meters (id, code, aggregation, field, group_by, allow_negative)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (e.originator_id, e.code, e.aggregation, e.field, list(e.group_by), e.allow_negative),
        )
        return
    cur.execute(
        "UPDATE usage_meters SET aggregation = %s, field = %s, group_by = %s, allow_negative = %s"
        " WHERE id = %s",
        (e.aggregation, e.field, list(e.group_by), e.allow_negative, e.originator_id),
    )


def _load_rules(cur: Cursor[Any], codes: set[str], rules: dict[str, MeterRule]) -> None:
    """The rules of these meters, in one query."""
    if not codes:
        return
    cur.execute("SELECT code, aggregation, field, group_by, allow_negative FROM usage_meters"
                " WHERE code = ANY(%s)", (sorted(codes),))
    for row in cur.fetchall():
        rules[row[0]] = _rule(row)


# One statement per batch, its rows in key order (concurrent projector workers take the row
# locks in the same order, so they cannot deadlock).
_UPSERT_TOTALS = """
INSERT INTO usage_totals AS t (organisation_id, project_id, metric, granularity, period_start,
    group_key, group_values, count, sum, max, latest_value, latest_at, latest_position)
SELECT o, p, m, g, d, k, v::jsonb, n, s, x, lv, la, lp FROM unnest(
    %s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::date[], %s::text[], %s::text[],
    %s::int8[], %s::numeric[], %s::numeric[], %s::numeric[], %s::timestamptz[], %s::int8[])
    AS r(o, p, m, g, d, k, v, n, s, x, lv, la, lp)
ON CONFLICT (organisation_id, metric, granularity, period_start, project_id, group_key)
DO UPDATE SET count = t.count + excluded.count, sum = t.sum + excluded.sum,
    max = GREATEST(t.max, excluded.max),
    latest_value = CASE WHEN (excluded.latest_at, excluded.latest_position)
        > (t.latest_at, t.latest_position) THEN excluded.latest_value ELSE t.latest_value END,
    latest_at = GREATEST(t.latest_at, excluded.latest_at),
    latest_position = CASE WHEN (excluded.latest_at, excluded.latest_position)
        > (t.latest_at, t.latest_position) THEN excluded.latest_position ELSE t.latest_position END
"""
_INSERT_UNIQUES = """
INSERT INTO usage_unique (organisation_id, project_id, metric, granularity, period_start,
    group_key, value)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::date[], %s::text[],
    %s::text[])
ON CONFLICT DO NOTHING
"""


def _flush(cur: Cursor[Any], totals: dict[Bucket, _Totals], uniques: set[Any]) -> None:
    rows = [(*bucket, json.dumps(t.group_values), t.count, t.sum, t.max, t.latest[2],
             t.latest[0], t.latest[1])
            for bucket, t in sorted(totals.items(), key=lambda kv: str(kv[0]))
            if t.latest is not None]
    if rows:
        cur.execute(_UPSERT_TOTALS, [list(column) for column in zip(*rows, strict=True)])
    totals.clear()
    if uniques:
        columns = zip(*sorted(uniques, key=str), strict=True)
        cur.execute(_INSERT_UNIQUES, [list(column) for column in columns])
    uniques.clear()


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("usage_meters", "usage_totals", "usage_unique"),
    handlers={Meter.Defined: _noop, Meter.Redefined: _noop, Usage.Recorded: _noop},
    batch=_apply_batch,
    views={Usage.Recorded: UsageView},
)


# ---- queries --------------------------------------------------------------------------------

_QUANTITY = {
    "count": "sum(count)::numeric",
    "sum": "sum(sum)",
    "max": "max(max)",
    "latest": "(array_agg(latest_value ORDER BY latest_at DESC, latest_position DESC))[1]",
}


@dataclass(frozen=True)
class UsageQuery:
    organisation_id: UUID
    metric: str
    granularity: str
    start: date  # first period start included
    end: date  # periods starting before this
    project_id: UUID | None = None
    group_by: tuple[str, ...] = ()


def meter_rule(conn: Connection[Any], code: str) -> MeterRule | None:
    row = conn.execute("SELECT code, aggregation, field, group_by, allow_negative FROM usage_meters"
                       " WHERE code = %s", (code,)).fetchone()
    return _rule(row) if row else None


def has_usage(conn: Connection[Any], code: str) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM usage_totals WHERE metric = %s)",
                       (code,)).fetchone()
    return bool(row and row[0])


def quantities(conn: Connection[Any], q: UsageQuery, aggregation: str) -> list[dict[str, Any]]:
    """One row per period (and project, and group values when asked): period_start, quantity."""
    table = "usage_unique" if aggregation == "unique_count" else "usage_totals"
    quantity = "count(DISTINCT value)::numeric" if aggregation == "unique_count" else _QUANTITY[aggregation]
    keys = ["period_start"] + (["project_id"] if q.project_id else [])
    # group_key is the canonical JSON of the meter's group_by values ('' when it has none).
    groups = [f"NULLIF(x.group_key, '')::jsonb ->> %(g{i})s" for i, _ in enumerate(q.group_by)]
    select_groups = "".join(f", {g} AS g{i}" for i, g in enumerate(groups))
    group_cols = ", ".join(keys + [f"g{i}" for i in range(len(groups))])
    params: dict[str, Any] = {"org": q.organisation_id, "metric": q.metric, "gran": q.granularity,
                              "start": q.start, "end": q.end, "project": q.project_id,
                              "limit": QUERY_MAX_ROWS}
    params |= {f"g{i}": name for i, name in enumerate(q.group_by)}
    sql = (
        f"SELECT {group_cols}, {quantity} AS quantity FROM ("
        f" SELECT x.*{select_groups} FROM {table} x"
        " WHERE organisation_id = %(org)s AND metric = %(metric)s AND granularity = %(gran)s"
        " AND period_start >= %(start)s AND period_start < %(end)s"
        " AND (%(project)s::uuid IS NULL OR project_id = %(project)s)"
        f") s GROUP BY {group_cols} ORDER BY {group_cols} LIMIT %(limit)s"
    )
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.encode(), params)  # type: ignore[call-overload]
        return cur.fetchall()


def period_quantities(conn: Connection[Any], month_start: date) -> dict[UUID, dict[str, Decimal]]:
    """Every organisation's quantity per meter for the month starting `month_start` (local
    dates), all projects together: what an invoice run prices. One pass over the month."""
    out: dict[UUID, dict[str, Decimal]] = {}
    rows = conn.execute(
        """SELECT t.organisation_id, t.metric, CASE m.aggregation
                WHEN 'count' THEN sum(t.count)::numeric
                WHEN 'sum' THEN sum(t.sum)
                WHEN 'max' THEN max(t.max)
                WHEN 'latest' THEN (array_agg(t.latest_value
                                    ORDER BY t.latest_at DESC, t.latest_position DESC))[1]
                END
           FROM usage_totals t JOIN usage_meters m ON m.code = t.metric
           WHERE t.granularity = 'month' AND t.period_start = %s AND m.aggregation <> 'unique_count'
           GROUP BY t.organisation_id, t.metric, m.aggregation""",
        (month_start,),
    ).fetchall()
    rows += conn.execute(
        """SELECT organisation_id, metric, count(DISTINCT value)::numeric FROM usage_unique
           WHERE granularity = 'month' AND period_start = %s GROUP BY organisation_id, metric""",
        (month_start,),
    ).fetchall()
    for org, metric, quantity in rows:
        out.setdefault(org, {})[metric] = Decimal(quantity)
    return out
