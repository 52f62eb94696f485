"""The usage totals read model: per organisation, project, meter, day and month (in the
organisation's timezone) and group_by values — count, sum, max, latest, and the distinct values
behind unique_count (kept exactly, not estimated). Its own copy of meter definitions keeps a
rebuild a pure function of the ledger."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.rows import dict_row

from domain.meter import Meter
from domain.usage import MeterRule, Usage, local_day
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
# While folding a batch: (organisation, project as ints — UUID hashing is slow Python —, metric,
# group key, local day). Months are merged from days when the batch is written.
DayKey = tuple[int, int, str, str, date]


@dataclass
class _Totals:
    group_values: dict[str, str]
    count: int = 0
    sum: Decimal = Decimal(0)
    max: Decimal | None = None
    latest: tuple[datetime, int, Decimal] | None = None

    def add(self, value: Decimal, at: datetime, position: int) -> None:
        self.count += 1
        self.sum += value
        self.max = value if self.max is None else max(self.max, value)
        if self.latest is None or (at, position) > self.latest[:2]:
            self.latest = (at, position, value)

    def merge(self, other: _Totals) -> None:
        self.count += other.count
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


class UsageView(msgspec.Struct, frozen=True):
    """What this model reads of a Usage.Recorded (the projector decodes only this)."""

    organisation_id: UUID
    project_id: UUID
    metric: str
    value: Decimal
    occurred_at: datetime
    timezone: str
    properties: dict[str, str]


class _Fold:
    """One batch's usage, folded per day bucket before anything is written."""

    def __init__(self) -> None:
        self.days: dict[DayKey, _Totals] = {}
        self.uniques: set[tuple[DayKey, str]] = set()
        self.ids: dict[int, UUID] = {}
        # Many events share a moment and group values: compute each once.
        self._local_days: dict[tuple[datetime, str], date] = {}
        self._groups: dict[tuple[str, ...], tuple[dict[str, str], str]] = {}

    def add(self, e: UsageView | Usage.Recorded, rule: MeterRule, position: int) -> None:
        props = e.properties
        values = (e.metric, *(props.get(k, "") for k in rule.group_by))
        known = self._groups.get(values)
        if known is None:
            groups = {k: props.get(k, "") for k in rule.group_by}
            known = self._groups[values] = (groups, group_key(groups))
        moment = (e.occurred_at, e.timezone)
        day = self._local_days.get(moment)
        if day is None:
            day = self._local_days[moment] = local_day(e.occurred_at, e.timezone)
        org, project = e.organisation_id.int, e.project_id.int
        if org not in self.ids:
            self.ids[org] = e.organisation_id
        if project not in self.ids:
            self.ids[project] = e.project_id
        key = (org, project, e.metric, known[1], day)
        t = self.days.get(key)
        if t is None:
            t = self.days[key] = _Totals(known[0])
        t.add(e.value, e.occurred_at, position)
        if rule.aggregation == "unique_count" and rule.field is not None:
            self.uniques.add((key, props[rule.field]))

    def flush(self, cur: Cursor[Any]) -> None:
        totals: dict[Bucket, _Totals] = {}
        for (org, project, metric, key, day), t in self.days.items():
            ids = (self.ids[org], self.ids[project], metric)
            totals[(*ids, "day", day, key)] = t
            month = (*ids, "month", day.replace(day=1), key)
            merged = totals.get(month)
            if merged is None:
                merged = totals[month] = _Totals(t.group_values)
            merged.merge(t)
        uniques = {
            (self.ids[org], self.ids[project], metric, granularity, start, key, value)
            for (org, project, metric, key, day), value in self.uniques
            for granularity, start in (("day", day), ("month", day.replace(day=1)))
        }
        _flush(cur, totals, uniques)
        self.days.clear()
        self.uniques.clear()


def _apply_batch(cur: Cursor[Any], items: list[tuple[Any, int]]) -> None:
    rules: dict[str, MeterRule] = {}
    fold = _Fold()
    for event, position in items:
        if isinstance(event, (Meter.Defined, Meter.Redefined)):
            fold.flush(cur)
            _upsert_meter(cur, event)
            rules.clear()
            continue
        rule = rules.get(event.metric) or _load_rule(cur, event.metric, rules)
        if rule is None:
            raise LookupError(f"usage for unknown meter {event.metric!r}")
        fold.add(event, rule, position)
    fold.flush(cur)


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


def _load_rule(cur: Cursor[Any], code: str, rules: dict[str, MeterRule]) -> MeterRule | None:
    cur.execute("SELECT code, aggregation, field, group_by, allow_negative FROM usage_meters"
                " WHERE code = %s", (code,))
    row = cur.fetchone()
    if row is None:
        return None
    rules[code] = _rule(row)
    return rules[code]


def _flush(cur: Cursor[Any], totals: dict[Bucket, _Totals], uniques: set[Any]) -> None:
    if totals:
        cur.executemany(
            """INSERT INTO usage_totals AS t (organisation_id, project_id, metric, granularity,
                   period_start, group_key, group_values, count, sum, max, latest_value,
                   latest_at, latest_position)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (organisation_id, metric, granularity, period_start, project_id, group_key)
               DO UPDATE SET count = t.count + excluded.count, sum = t.sum + excluded.sum,
                   max = GREATEST(t.max, excluded.max),
                   latest_value = CASE WHEN (excluded.latest_at, excluded.latest_position)
                       > (t.latest_at, t.latest_position) THEN excluded.latest_value
                       ELSE t.latest_value END,
                   latest_at = GREATEST(t.latest_at, excluded.latest_at),
                   latest_position = CASE WHEN (excluded.latest_at, excluded.latest_position)
                       > (t.latest_at, t.latest_position) THEN excluded.latest_position
                       ELSE t.latest_position END""",
            [
                (*bucket, json.dumps(t.group_values), t.count, t.sum, t.max, t.latest[2],
                 t.latest[0], t.latest[1])
                for bucket, t in totals.items()
                if t.latest is not None
            ],
        )
        totals.clear()
    if uniques:
        cur.executemany(
            "INSERT INTO usage_unique (organisation_id, project_id, metric, granularity,"
            " period_start, group_key, value) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            sorted(uniques, key=str),
        )
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
