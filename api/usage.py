"""Usage queries: an organisation's (admin) or the calling project's own (API key).

With `metric`, one meter's quantities per period (per `group_by` values if asked); without it,
a summary: every meter's quantity per period, each by its own aggregation (group_by needs a
metric, since each meter has its own group_by properties: a 422 says so)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import anyio
import msgspec
from litestar import Request, get
from litestar.params import FromPath

from api.deps import ApiDeps, Deps
from api.ingest import authorise_key
from api.pagination import ascii_digits, parse_limit
from api.problems import parse_id
from api.read_your_writes import wait_caught_up, wait_for_position
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.meter import GROUP_BY_MAX_KEYS
from domain.period import month_after, month_of
from projections import organisations, usage_totals

MAX_DAYS_BY_DAY = 400
MAX_MONTHS = 120
OFFSET_CURSOR_MAX_DIGITS = 6
# Dates a usage query may name: far enough for any billing history, near enough that moving a
# bound to the organisation's timezone or to the next month cannot leave the calendar.
QUERY_DATE_MIN = date(1970, 1, 1)
QUERY_DATE_MAX = date(9998, 12, 31)
GROUP_BY_PARAM_MAX_CHARS = 4 * 65  # GROUP_BY_MAX_KEYS property names of up to 64 characters


class UsageItem(msgspec.Struct, omit_defaults=True):
    metric: str
    period_start: datetime
    period_end: datetime
    quantity: str
    project_id: UUID | None = None
    group: dict[str, str | None] | None = None


class UsagePage(msgspec.Struct):
    items: list[UsageItem]
    next_cursor: str | None


def decimal_text(q: Decimal) -> str:
    """Exact decimal text without exponent or trailing zeros: 12.50 -> "12.5", 100 -> "100"."""
    if q == q.to_integral_value():
        return str(q.quantize(Decimal(1)))
    return format(q.normalize(), "f")


def _local_date(raw: str | None, name: str, tz: ZoneInfo, default: date) -> date:
    if raw is None:
        return default
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
        else:
            at = datetime.fromisoformat(raw)
            if at.tzinfo is None:
                raise ValidationFailed([FieldError(name, "must include an offset")])
            day = at.astimezone(tz).date()
    except (ValueError, OverflowError):  # OverflowError: an offset that leaves the calendar
        raise ValidationFailed([FieldError(name, "must be a date or RFC 3339 time")]) from None
    if not QUERY_DATE_MIN <= day <= QUERY_DATE_MAX:
        raise ValidationFailed([FieldError(
            name, f"must lie between {QUERY_DATE_MIN.isoformat()} and {QUERY_DATE_MAX.isoformat()}")])
    return day


def build_query(
    params: dict[str, str | None], org_id: UUID, tz: ZoneInfo, project_id: UUID | None,
    today: date,
) -> usage_totals.UsageQuery:
    problems: list[FieldError] = []
    metric = params.get("metric") or None  # None: every meter (a summary)
    granularity = params.get("granularity") or "month"
    if granularity not in usage_totals.GRANULARITIES:
        problems.append(FieldError("granularity", "must be day or month"))
    month_start = month_of(today)
    try:
        start = _local_date(params.get("from"), "from", tz, month_start)
        end = _local_date(params.get("to"), "to", tz, month_after(month_start))
    except ValidationFailed as e:
        raise ValidationFailed(problems + e.errors) from None
    if granularity == "month":
        start = month_of(start)
    if end <= start:
        problems.append(FieldError("to", "must be after from"))
    limit_days = MAX_DAYS_BY_DAY if granularity == "day" else MAX_MONTHS * 31
    if (end - start).days > limit_days:
        problems.append(FieldError("to", f"at most {limit_days} days after from"))
    raw_group_by = params.get("group_by") or ""
    # Each name once, in the order given; a long list would become as many SQL columns.
    group_by = tuple(dict.fromkeys(g for g in raw_group_by.split(",") if g))
    if len(raw_group_by) > GROUP_BY_PARAM_MAX_CHARS or len(group_by) > GROUP_BY_MAX_KEYS:
        problems.append(FieldError("group_by", f"at most {GROUP_BY_MAX_KEYS} property names"))
    if group_by and metric is None:
        problems.append(FieldError("group_by", "needs a metric: each meter has its own group_by "
                                               "properties (leave both out for every meter's totals)"))
    if problems:
        raise ValidationFailed(problems)
    return usage_totals.UsageQuery(org_id, metric, granularity, start, end, project_id, group_by)


async def answer(deps: ApiDeps, request: Request[Any, Any, Any], org_id: UUID,
                 project_id: UUID | None) -> UsagePage:
    await wait_for_position(deps, request, usage_totals.NAME)
    params = {k: request.query_params.get(k) for k in ("metric", "granularity", "from", "to",
                                                      "group_by", "limit", "cursor")}
    limit = parse_limit(params["limit"])
    offset = _offset(params["cursor"])

    def run() -> tuple[usage_totals.UsageQuery, ZoneInfo,
                       list[usage_totals.QuantityRow] | list[usage_totals.SummaryRow]]:
        with deps.read_pool.connection() as conn:
            org = organisations.get(conn, org_id)
            if org is None:
                raise NotFound("organisation", org_id)
            tz = ZoneInfo(org.timezone)
            query = build_query(params, org_id, tz, project_id, datetime.now(tz).date())
            if query.metric is None:
                return query, tz, usage_totals.summary(conn, query)
            rule = usage_totals.meter_rule(conn, query.metric)
            if rule is None:
                raise ValidationFailed([FieldError("metric", f"no meter {query.metric!r} has usage")])
            unknown = [g for g in query.group_by if g not in rule.group_by]
            if unknown:
                raise ValidationFailed([FieldError(
                    "group_by", f"{', '.join(unknown)} not in this meter's group_by {list(rule.group_by)}")])
            return query, tz, usage_totals.quantities(conn, query, rule.aggregation)

    try:
        query, tz, rows = await anyio.to_thread.run_sync(run)
    except NotFound:
        # An organisation created a moment ago may not be in its read model yet (the usage
        # read does not wait for the head, which ingestion keeps moving): before answering
        # 404, wait once for that read model to reach the ledger's head and look again.
        await wait_caught_up(deps, request, organisations.NAME)
        query, tz, rows = await anyio.to_thread.run_sync(run)
    page = rows[offset: offset + limit]
    items = [_summary_item(query, tz, r) if isinstance(r, usage_totals.SummaryRow)
             else _item(query, tz, r) for r in page]
    more = offset + limit < len(rows)
    return UsagePage(items, str(offset + limit) if more else None)


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not ascii_digits(cursor, OFFSET_CURSOR_MAX_DIGITS):
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API returned")])
    return int(cursor)


def _bounds(q: usage_totals.UsageQuery, tz: ZoneInfo, start: date) -> tuple[datetime, datetime]:
    end = start + timedelta(days=1) if q.granularity == "day" else month_after(start)
    return datetime.combine(start, time(0), tz), datetime.combine(end, time(0), tz)


def _summary_item(q: usage_totals.UsageQuery, tz: ZoneInfo, row: usage_totals.SummaryRow) -> UsageItem:
    start, end = _bounds(q, tz, row.period_start)
    return UsageItem(metric=row.metric, period_start=start, period_end=end,
                     quantity=decimal_text(row.quantity), project_id=row.project_id)


def _item(q: usage_totals.UsageQuery, tz: ZoneInfo, row: usage_totals.QuantityRow) -> UsageItem:
    assert q.metric is not None
    start, end = _bounds(q, tz, row.period_start)
    group = dict(zip(q.group_by, row.groups, strict=True)) if q.group_by else None
    return UsageItem(
        metric=q.metric,
        period_start=start,
        period_end=end,
        quantity=decimal_text(row.quantity),
        project_id=row.project_id,
        group=group,
    )


@get("/admin/v1/organisations/{org_id:uuid}/usage",
     summary="An organisation's usage: one meter's (metric=), or every meter's without metric",
     tags=["usage"])
async def organisation_usage(org_id: FromPath[UUID],
                             request: Request[Any, Any, Any], deps: Deps) -> UsagePage:
    raw_project = request.query_params.get("project_id")
    project = parse_id(raw_project, "project") if raw_project else None
    return await answer(deps, request, org_id, project)


@get("/api/v1/usage", summary="The calling project's own usage: one meter's (metric=), or every"
                              " meter's without metric", tags=["usage"])
async def own_usage(request: Request[Any, Any, Any], deps: Deps) -> UsagePage:
    key, _ = await authorise_key(request, deps)
    return await answer(deps, request, key.organisation_id, key.project_id)
