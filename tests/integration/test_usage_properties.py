"""Hypothesis: for any sequence of batches with duplicates, out-of-order timestamps and
interleaved projects, usage totals equal a straightforward fold over the distinct events; and
a rebuilt projection equals the live one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.bookkeeping import dead_letter_counts
from adapters.maintenance import rebuild
from adapters.usage_writer import encode_usage
from domain.period import local_day
from domain.records import KeyRecord
from domain.services.catalogue import CatalogueService
from domain.usage import UsageFact, fold
from infra.wiring import Runtime
from projections import usage_totals
from tests.conftest import (
    ThreadedWriter,
    background_roles,
    table_rows,
    threaded_writer,
    tracked,
    wait_sync,
)

TZ = "Asia/Kolkata"
NOW = datetime.now(UTC).replace(microsecond=0)
METERS = {"n": ("count", None), "s": ("sum", None), "m": ("max", None), "l": ("latest", None),
          "u": ("unique_count", "user"), "g": ("sum", None)}
GROUP_BY = {"g": ("user",)}  # totals per user


@dataclass(frozen=True)
class Sent:
    project: int
    event_id: str
    metric: str
    value: Decimal
    minutes_ago: int
    user: str


events = st.builds(
    Sent,
    project=st.integers(0, 2),
    event_id=st.sampled_from([f"e{i}" for i in range(12)]),
    metric=st.sampled_from(sorted(METERS)),
    value=st.sampled_from([Decimal("0"), Decimal("1"), Decimal("2.5"), Decimal("0.001"),
                           Decimal("7"), Decimal("1000000.25"),
                           # 36 digits apart: a sum of both needs more than decimal's default 28
                           Decimal("1E+17"), Decimal("1E-18")]),
    minutes_ago=st.integers(0, 60 * 24 * 34),  # across up to two local months, out of order
    user=st.sampled_from(["u1", "u2", "u3"]),
)
batches = st.lists(st.lists(events, min_size=1, max_size=8), min_size=1, max_size=6)


@pytest.fixture
def live(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    svc = CatalogueService(runtime.ledger, lambda: datetime.now(UTC), uuid4)
    for code, (aggregation, field) in METERS.items():
        svc.define_meter(code=code, name=code, aggregation=aggregation, field=field,
                         group_by=list(GROUP_BY.get(code, ())), allow_negative=False,
                         has_usage=lambda _: False, actor=None)
    with threaded_writer(runtime) as writer, background_roles(runtime, {"relay", "project"}):
        yield runtime, writer


@dataclass
class Recorded:
    value: Decimal
    occurred_at: datetime
    properties: dict[str, str]


def _expected(org_projects: list[UUID], sent: list[list[Sent]]) -> dict[Any, Decimal]:
    seen: set[tuple[int, str]] = set()
    by_bucket: dict[tuple[Any, ...], list[tuple[int, Recorded]]] = defaultdict(list)
    order = 0
    for batch in sent:
        for e in batch:
            if (e.project, e.event_id) in seen:
                continue  # a resend: the first one counts, whatever this one says
            seen.add((e.project, e.event_id))
            at = NOW - timedelta(minutes=e.minutes_ago)
            rec = Recorded(e.value, at, {"user": e.user})
            month = local_day(at, TZ).replace(day=1)
            group = (e.user,) if e.metric in GROUP_BY else ()
            order += 1
            for scope in (org_projects[e.project], None):
                by_bucket[(scope, e.metric, "month", month, *group)].append((order, rec))
                by_bucket[(scope, e.metric, "day", local_day(at, TZ), *group)].append((order, rec))
    return {
        key: fold(METERS[key[1]][0], METERS[key[1]][1], items)  # type: ignore[arg-type]
        for key, items in by_bucket.items()
    }


def _actual(rt: Runtime, org: UUID, projects: list[UUID]) -> dict[Any, Decimal]:
    out: dict[Any, Decimal] = {}
    with rt.pool.connection() as conn:
        for metric, (aggregation, _) in METERS.items():
            for granularity in ("month", "day"):
                for scope in [*projects, None]:
                    group_by = GROUP_BY.get(metric, ())
                    q = usage_totals.UsageQuery(org, metric, granularity, date(2000, 1, 1),
                                                date(2100, 1, 1), scope, group_by)
                    for row in usage_totals.quantities(conn, q, aggregation):
                        groups = row.groups
                        out[(scope, metric, granularity, row.period_start, *groups)] = Decimal(
                            row.quantity)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=batches)
@example(sent=[[Sent(0, "big", "s", Decimal("1E+17"), 5, "u1"),
                Sent(0, "tiny", "s", Decimal("1E-18"), 5, "u1")]])  # exact, not 28 digits
def test_usage_totals_equal_the_fold_over_distinct_events(
    live: tuple[Runtime, ThreadedWriter], sent: list[list[Sent]]
) -> None:
    rt, writer = live
    org, projects = uuid4(), [uuid4() for _ in range(3)]
    keys = [KeyRecord(uuid4(), "p", "h", p, org, TZ, None, False) for p in projects]
    position = 0
    for batch in sent:
        rows = [encode_usage(keys[e.project], UsageFact(
            e.event_id, e.metric, e.value, NOW - timedelta(minutes=e.minutes_ago), {"user": e.user}),
            NOW) for e in batch]
        position = writer.submit(rows).result(10).position
    wait_sync(lambda: tracked(rt, usage_totals.NAME) >= position, "usage totals")
    expected = _expected(projects, sent)
    assert expected  # every example sends at least one event
    assert _actual(rt, org, projects) == expected


def test_a_rebuilt_usage_projection_equals_the_live_one(live: tuple[Runtime, ThreadedWriter]) -> None:
    rt, writer = live
    org = uuid4()
    keys = [KeyRecord(uuid4(), "p", "h", uuid4(), org, TZ, None, False) for _ in range(2)]
    position = 0
    for i in range(40):
        fact = UsageFact(f"e{i % 30}", "smnlug"[i % 6], Decimal(i) / 4,
                         NOW - timedelta(hours=7 * i), {"user": f"u{i % 4}"})
        position = writer.submit([encode_usage(keys[i % 2], fact, NOW)]).result(10).position
    wait_sync(lambda: tracked(rt, usage_totals.NAME) >= position, "usage totals")
    tables = ("usage_totals", "usage_unique", "usage_meters")
    orders = {"usage_totals": "organisation_id, metric, granularity, period_start, project_id, group_key",
              "usage_unique": "organisation_id, metric, granularity, period_start, project_id, value",
              "usage_meters": "code"}
    live_rows = {t: table_rows(rt, t, orders[t]) for t in tables}
    assert live_rows["usage_totals"]
    rebuild(rt.pool, rt.ledger, usage_totals.READ_MODEL)
    assert {t: table_rows(rt, t, orders[t]) for t in tables} == live_rows


def test_unique_count_usage_without_its_field_is_folded_not_dead_lettered(
    live: tuple[Runtime, ThreadedWriter],
) -> None:
    """The API refuses such an event, but one checked before its meter became unique_count can
    be ordered after the change: it adds no distinct value, and everything else still counts."""
    rt, writer = live
    org = uuid4()
    key = KeyRecord(uuid4(), "p", "h", uuid4(), org, TZ, None, False)
    sent = [("a", "u", {"user": "u1"}), ("b", "u", {}), ("c", "u", {"user": "u2"}),
            ("d", "u", {"other": "x"}), ("e", "n", {})]
    rows = [encode_usage(key, UsageFact(event_id, metric, Decimal(1), NOW, props), NOW)
            for event_id, metric, props in sent]
    position = writer.submit(rows).result(10).position
    wait_sync(lambda: tracked(rt, usage_totals.NAME) >= position, "usage totals")
    with rt.pool.connection() as conn:
        assert dead_letter_counts(conn).get(usage_totals.NAME, 0) == 0
    month = local_day(NOW, TZ).replace(day=1)
    actual = _actual(rt, org, [key.project_id])
    assert actual[(None, "u", "month", month)] == Decimal(2)  # u1 and u2
    assert actual[(None, "n", "month", month)] == Decimal(1)
    recorded = [(i, Recorded(Decimal(1), NOW, props)) for i, (_, m, props) in enumerate(sent) if m == "u"]
    assert fold("unique_count", "user", recorded) == Decimal(2)  # type: ignore[arg-type]
