"""The usage totals read model: per organisation, project, meter, day and month (in the
organisation's timezone) and group_by values — count, sum, max, latest, and the distinct values
behind unique_count (kept exactly, not estimated). Its own copy of meter definitions keeps a
rebuild a pure function of the ledger. The fold itself, in memory, is projections/usage_fold.py;
this module owns the tables, what is written to them, and the queries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor

from domain.meter import Meter
from domain.usage import MeterRule, Usage
from projections.base import ReadModel
from projections.usage_fold import Bucket, Fold, Totals, Unique, UsageView

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

def _rule(row: Sequence[Any]) -> MeterRule:
    return MeterRule(row[0], row[1], row[2], tuple(row[3]), row[4])


def _noop(cur: Cursor[Any], event: Any, position: int) -> None:
    """Never called: this model applies whole batches (see `_apply_batch`)."""
    raise AssertionError("usage totals apply in batches")


_METER_EVENTS = frozenset({Meter.Defined, Meter.Redefined})


def _apply_batch(cur: Cursor[Any], items: list[tuple[Any, int]]) -> None:
    rules: dict[str, MeterRule] = {}
    fold = Fold()

    def write() -> None:
        _load_rules(cur, fold.pending_meters() - rules.keys(), rules)
        _flush(cur, *fold.take(rules))

    meters = [i for i, item in enumerate(items) if type(item[0]) in _METER_EVENTS]
    start = 0
    for i in meters:  # a meter's definition applies to the usage after it: fold up to there
        fold.add_all(items[start:i])
        write()
        _upsert_meter(cur, items[i][0])
        rules.clear()
        start = i + 1
    fold.add_all(items[start:])
    write()


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


def _flush(cur: Cursor[Any], totals: dict[Bucket, Totals], uniques: set[Unique]) -> None:
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
    # Counts, sums, maxima and distinct values commute; `latest` breaks ties by position.
    order_free=frozenset({Usage.Recorded}),
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
    metric: str | None  # None: every meter (summary), never with group_by
    granularity: str
    start: date  # first period start included
    end: date  # periods starting before this
    project_id: UUID | None = None
    group_by: tuple[str, ...] = ()


class QuantityRow(msgspec.Struct, frozen=True):
    """One period's quantity, per project when the query names one, and per group_by values
    (in the query's order; None where an event had no such property)."""

    period_start: date
    quantity: Decimal
    project_id: UUID | None = None
    groups: tuple[str | None, ...] = ()


def meter_rule(conn: Connection[Any], code: str) -> MeterRule | None:
    row = conn.execute("SELECT code, aggregation, field, group_by, allow_negative FROM usage_meters"
                       " WHERE code = %s", (code,)).fetchone()
    return _rule(row) if row else None


def has_usage(conn: Connection[Any], code: str) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM usage_totals WHERE metric = %s)",
                       (code,)).fetchone()
    return bool(row and row[0])


def quantities(conn: Connection[Any], q: UsageQuery, aggregation: str) -> list[QuantityRow]:
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
    # Columns in `group_cols` order, then the quantity.
    rows = conn.execute(sql.encode(), params).fetchall()
    with_project = q.project_id is not None
    return [QuantityRow(period_start=row[0], quantity=Decimal(row[-1]),
                        project_id=row[1] if with_project else None,
                        groups=tuple(row[1 + with_project:-1]))
            for row in rows]


class SummaryRow(msgspec.Struct, frozen=True):
    """One meter's quantity in one period (per project when the query names one)."""

    metric: str
    period_start: date
    quantity: Decimal
    project_id: UUID | None = None


def summary(conn: Connection[Any], q: UsageQuery) -> list[SummaryRow]:
    """Every meter's quantity per period of the organisation (of the query's project, if it
    names one), each by its own aggregation: one row per (metric, period), ordered so."""
    project = ", t.project_id" if q.project_id else ""
    params: dict[str, Any] = {"org": q.organisation_id, "gran": q.granularity, "start": q.start,
                              "end": q.end, "project": q.project_id, "limit": QUERY_MAX_ROWS}
    where = ("t.organisation_id = %(org)s AND t.granularity = %(gran)s"
             " AND t.period_start >= %(start)s AND t.period_start < %(end)s"
             " AND (%(project)s::uuid IS NULL OR t.project_id = %(project)s)")
    sql = (
        f"SELECT t.metric, t.period_start{project}, CASE m.aggregation"
        "  WHEN 'count' THEN sum(t.count)::numeric WHEN 'sum' THEN sum(t.sum)"
        "  WHEN 'max' THEN max(t.max)"
        "  WHEN 'latest' THEN (array_agg(t.latest_value"
        "                      ORDER BY t.latest_at DESC, t.latest_position DESC))[1] END"
        " FROM usage_totals t JOIN usage_meters m ON m.code = t.metric"
        f" WHERE {where} AND m.aggregation <> 'unique_count'"
        f" GROUP BY t.metric, t.period_start{project}, m.aggregation"
        f" UNION ALL SELECT t.metric, t.period_start{project}, count(DISTINCT t.value)::numeric"
        f" FROM usage_unique t WHERE {where} GROUP BY t.metric, t.period_start{project}"
        f" ORDER BY 1, 2{', 3' if project else ''} LIMIT %(limit)s"
    )
    rows = conn.execute(sql.encode(), params).fetchall()
    return [SummaryRow(metric=row[0], period_start=row[1], quantity=Decimal(row[-1]),
                       project_id=row[2] if q.project_id else None) for row in rows]


def period_quantities(conn: Connection[Any], month_start: date,
                      org_ids: Sequence[UUID] | None = None) -> dict[UUID, dict[str, Decimal]]:
    """Every organisation's quantity per meter for the month starting `month_start` (local
    dates), all projects together: what an invoice run prices. One pass over the month; only
    `org_ids`' when given (one batch of an invoice run)."""
    out: dict[UUID, dict[str, Decimal]] = {}
    only = "" if org_ids is None else " AND t.organisation_id = ANY(%b::uuid[])"
    params: tuple[Any, ...] = (month_start,) if org_ids is None else (month_start, list(org_ids))
    rows = conn.execute(
        b"""SELECT t.organisation_id, t.metric, CASE m.aggregation
                WHEN 'count' THEN sum(t.count)::numeric
                WHEN 'sum' THEN sum(t.sum)
                WHEN 'max' THEN max(t.max)
                WHEN 'latest' THEN (array_agg(t.latest_value
                                    ORDER BY t.latest_at DESC, t.latest_position DESC))[1]
                END
           FROM usage_totals t JOIN usage_meters m ON m.code = t.metric
           WHERE t.granularity = 'month' AND t.period_start = %s AND m.aggregation <> 'unique_count'"""
 + only.encode() + b"""
           GROUP BY t.organisation_id, t.metric, m.aggregation""",
        params,
    ).fetchall()
    rows += conn.execute(
        b"""SELECT t.organisation_id, t.metric, count(DISTINCT t.value)::numeric FROM usage_unique t
           WHERE t.granularity = 'month' AND t.period_start = %s""" + only.encode()
        + b" GROUP BY t.organisation_id, t.metric",
        params,
    ).fetchall()
    for org, metric, quantity in rows:
        out.setdefault(org, {})[metric] = Decimal(quantity)
    return out
