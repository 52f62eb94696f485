"""POST /api/v1/events and the usage queries over real HTTP: every invalid input of docs/API.md's
ingestion table, idempotency forever, group commit under concurrency, read-your-writes."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
EVENTS = "/api/v1/events"
METERS = [
    {"code": "calls", "name": "Calls", "aggregation": "count", "group_by": ["region"]},
    {"code": "gb", "name": "GB", "aggregation": "sum", "allow_negative": True},
    {"code": "peak", "name": "Peak", "aggregation": "max"},
    {"code": "seats", "name": "Seats", "aggregation": "latest"},
    {"code": "mau", "name": "MAU", "aggregation": "unique_count", "field": "user"},
    {"code": "storage", "name": "Storage", "aggregation": "max", "field": "gb"},
]


@dataclasses.dataclass
class Tenant:
    org: str
    project: str
    key: str
    key_id: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def make_tenant(api: Api, name: str = "t") -> Tenant:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": name, "billing_email": "a@b.in"})).json()["id"]
    project = (await api.http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                   json={"name": "web"})).json()["id"]
    key = (await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                               json={"name": "k"})).json()
    return Tenant(org, project, key["key"], key["id"])


@pytest.fixture(scope="module")
async def tenant(api: Api) -> Tenant:
    for meter in METERS:
        r = await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)
        assert r.status_code in (200, 201), r.text
    return await make_tenant(api)


def ev(event_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex if event_id is None else event_id, "metric": "calls"} | fields


async def usage(api: Api, t: Tenant, metric: str, position: str | None = None,
                **params: str) -> list[dict[str, Any]]:
    headers = t.auth | ({"X-Ledger-Position": position} if position else {})
    r = await api.http.get("/api/v1/usage", headers=headers, params={"metric": metric} | params)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def quantity(items: list[dict[str, Any]]) -> str:
    assert len(items) == 1, items
    return str(items[0]["quantity"])


NOW = datetime.now(UTC)


def _ahead(delta: timedelta) -> Callable[[], dict[str, Any]]:
    """An event stamped `delta` after the moment the test sends it: a stamp made at collection
    time falls back inside the accepted window when the suite reaches the test minutes later."""
    return lambda: ev(timestamp=(datetime.now(UTC) + delta).isoformat())


BAD_EVENTS: list[tuple[str, Any, str]] = [
    ("event_id missing", {"metric": "calls"}, "event_id"),
    ("event_id empty", ev(""), "event_id"),
    ("event_id too long", ev("x" * 129), "event_id"),
    ("event_id not a string", ev() | {"event_id": 7}, "event_id"),
    ("metric missing", {"event_id": "m1"}, "metric"),
    ("metric unknown", ev(metric="nope"), "metric"),
    ("timestamp without offset", ev(timestamp="2026-11-20T10:00:00"), "timestamp"),
    ("timestamp not a time", ev(timestamp="yesterday"), "timestamp"),
    ("timestamp 36 days old", ev(timestamp=(NOW - timedelta(days=36)).isoformat()), "timestamp"),
    ("timestamp 10 minutes ahead", _ahead(timedelta(minutes=10)), "timestamp"),
    ("value negative on a count meter", ev(value=-1), "value"),
    ("value NaN", ev(value="NaN"), "value"),
    ("value too many digits", ev(value="1234567890123456789"), "value"),
    ("value huge", ev(value="1e400"), "value"),
    ("value with an exponent no decimal context holds", ev(value="1e999999999999"), "value"),
    ("value of 30 significant digits", ev(value="1.00000000000000000000000000001"), "value"),
    ("value zero at an exponent Postgres cannot hold", ev(value="0E+9999999999"), "value"),
    ("value boolean", ev(value=True), "value"),
    ("properties not an object", ev(properties=[1]), "properties"),
    ("properties nested", ev(properties={"a": {"b": 1}}), "properties.a"),
    ("properties over 4 KiB", ev(properties={"p": "x" * 250, **{f"k{i}": "y" * 200 for i in range(20)}}),
     "properties"),
    ("unique_count without its field", ev(metric="mau", properties={"other": "1"}), "properties.user"),
    ("max meter without its field", ev(metric="storage", properties={"other": "1"}), "properties.gb"),
    ("max meter without properties", ev(metric="storage"), "properties.gb"),
    ("field not a number", ev(metric="storage", properties={"gb": "abc"}), "properties.gb"),
    ("field too large", ev(metric="storage", properties={"gb": "1e30"}), "properties.gb"),
    ("field negative", ev(metric="storage", properties={"gb": "-1"}), "properties.gb"),
    ("field a boolean", ev(metric="storage", properties={"gb": True}), "properties.gb"),
    ("value beside a field", ev(metric="storage", value="3", properties={"gb": "42.5"}), "value"),
    ("unknown field", ev(colour="red"), "colour"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
async def test_each_invalid_event_is_refused_and_nothing_is_stored(
    api: Api, tenant: Tenant, case: str, body: Any, field: str
) -> None:
    head = api.rt.ledger.head()
    body = body() if callable(body) else body
    batch = {"events": [ev(), body, ev()]}  # the valid neighbours are not stored either
    r = await api.http.post(EVENTS, headers=tenant.auth, json=batch)
    assert r.status_code == 422, (case, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    errors = r.json()["errors"]
    assert {(e["index"], e["field"]) for e in errors} == {(1, field)}, (case, errors)
    single = await api.http.post(EVENTS, headers=tenant.auth, json=body)
    assert single.status_code == 422
    assert api.rt.ledger.head() == head


BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed JSON", b'{"event_id": ', 400),
    ("array body", b"[1, 2]", 422),
    ("empty batch", b'{"events": []}', 422),
    ("batch with another field", b'{"events": [{"event_id": "a", "metric": "calls"}], "x": 1}', 422),
    ("events not an array", b'{"events": {"a": 1}}', 422),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_malformed_envelopes_are_refused(
    api: Api, tenant: Tenant, case: str, body: bytes, status: int
) -> None:
    head = api.rt.ledger.head()
    r = await api.http.post(EVENTS, headers=tenant.auth, content=body)
    assert r.status_code == status, (case, r.text)
    assert r.json()["status"] == status
    assert api.rt.ledger.head() == head


async def test_batches_over_1000_events_or_1_mib_are_refused(api: Api, tenant: Tenant) -> None:
    head = api.rt.ledger.head()
    r = await api.http.post(EVENTS, headers=tenant.auth, json={"events": [ev() for _ in range(1001)]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "events"
    big = {"events": [ev(properties={"pad": "x" * 250}) for _ in range(1000)]} | {}
    big["events"] += []
    huge = b'{"events": [' + b",".join(
        b'{"event_id": "%d", "metric": "calls", "properties": {"p": "%s"}}' % (i, b"x" * 1200)
        for i in range(1000)) + b"]}"
    assert len(huge) > 1024 * 1024
    r = await api.http.post(EVENTS, headers=tenant.auth, content=huge)
    assert r.status_code == 413 and r.json()["status"] == 413
    assert api.rt.ledger.head() == head


@pytest.mark.parametrize("header", [None, "Bearer bk_000000000000_nope", "Bearer not-a-key",
                                    "Basic abc"])
async def test_missing_or_unknown_key_is_401(api: Api, tenant: Tenant, header: str | None) -> None:
    head = api.rt.ledger.head()
    headers = {"Authorization": header} if header else {}
    r = await api.http.post(EVENTS, headers=headers, json=ev())
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert api.rt.ledger.head() == head


async def test_an_admin_token_is_not_an_api_key(api: Api, tenant: Tenant) -> None:
    r = await api.http.post(EVENTS, headers=AUTH, json=ev())
    assert r.status_code == 401


async def test_a_revoked_key_stops_working(api: Api) -> None:
    t = await make_tenant(api, "revoked")
    assert (await api.http.post(EVENTS, headers=t.auth, json=ev())).status_code == 202
    r = await api.http.delete(f"/admin/v1/api-keys/{t.key_id}", headers=AUTH)
    assert r.status_code == 204

    async def refused() -> bool:
        return (await api.http.post(EVENTS, headers=t.auth, json=ev())).status_code == 401

    deadline = asyncio.get_running_loop().time() + 5
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline, "revocation not effective in 5 s"
        await asyncio.sleep(0.05)
    listed = (await api.http.get(f"/admin/v1/projects/{t.project}/api-keys", headers=AUTH)).json()
    assert listed["items"][0]["revoked_at"] is not None
    assert t.key not in str(listed)  # never the secret


async def test_resends_are_duplicates_forever_and_never_reject_neighbours(api: Api) -> None:
    t = await make_tenant(api, "dups")
    first = await api.http.post(EVENTS, headers=t.auth, json={"events": [
        ev("a", metric="gb", value="1.5"), ev("b", metric="gb", value="2"),
        ev("a", metric="gb", value="100")]})
    assert first.status_code == 202 and first.json() == {"accepted": 2, "duplicates": 1}
    # Other traffic in between, then the same ids again, mixed with a new one.
    await api.http.post(EVENTS, headers=t.auth, json={"events": [ev(metric="gb", value="0")]})
    again = await api.http.post(EVENTS, headers=t.auth, json={"events": [
        ev("b", metric="gb", value="7"), ev("c", metric="gb", value="0.25")]})
    assert again.json() == {"accepted": 1, "duplicates": 1}
    items = await usage(api, t, "gb", again.headers["x-ledger-position"])
    assert quantity(items) == "3.75"


async def test_same_event_id_in_two_projects_is_two_events(api: Api) -> None:
    t1, t2 = await make_tenant(api, "p1"), await make_tenant(api, "p2")
    for t in (t1, t2):
        r = await api.http.post(EVENTS, headers=t.auth, json=ev("shared", metric="gb", value="1"))
        assert r.json() == {"accepted": 1, "duplicates": 0}


async def test_concurrent_requests_share_commits_and_count_each_event_once(api: Api) -> None:
    t = await make_tenant(api, "concurrent")
    shared = [ev(f"s{i}", metric="gb", value="1") for i in range(5)]

    async def send(n: int) -> dict[str, Any]:
        body = {"events": [*shared, *(ev(f"u{n}-{i}", metric="gb", value="0.5") for i in range(10))]}
        r = await api.http.post(EVENTS, headers=t.auth, json=body)
        assert r.status_code == 202, r.text
        return {"body": r.json(), "position": int(r.headers["x-ledger-position"])}

    results = await asyncio.gather(*(send(n) for n in range(24)))
    assert sum(r["body"]["accepted"] for r in results) == 5 + 24 * 10
    assert sum(r["body"]["duplicates"] for r in results) == 24 * 5 - 5
    items = await usage(api, t, "gb", str(max(r["position"] for r in results)))
    assert quantity(items) == "125"  # 5 x 1 + 240 x 0.5
    writer = api.role.writer
    assert writer is not None and writer.commits < writer.appended_events  # grouped


async def test_aggregations_groups_and_granularities(api: Api, tenant: Tenant) -> None:
    t = await make_tenant(api, "aggregations")
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    at = [(base + timedelta(minutes=i)).isoformat() for i in range(6)]
    events = [
        ev(metric="calls", properties={"region": "in"}), ev(metric="calls", properties={"region": "in"}),
        ev(metric="calls", properties={"region": "us"}),
        ev(metric="gb", value="10.5"), ev(metric="gb", value="-0.5"),
        ev(metric="peak", value="3"), ev(metric="peak", value="9.75"), ev(metric="peak", value="2"),
        ev(metric="seats", value="5", timestamp=at[3]), ev(metric="seats", value="8", timestamp=at[1]),
        ev(metric="seats", value="6", timestamp=at[3]),  # same time: the later ledger entry wins
        ev(metric="mau", properties={"user": "u1"}), ev(metric="mau", properties={"user": "u2"}),
        ev(metric="mau", properties={"user": "u1"}),
    ]
    r = await api.http.post(EVENTS, headers=t.auth, json={"events": events})
    assert r.json() == {"accepted": len(events), "duplicates": 0}
    pos = r.headers["x-ledger-position"]
    assert quantity(await usage(api, t, "calls", pos)) == "3"
    by_region = await usage(api, t, "calls", pos, group_by="region")
    assert {(i["group"]["region"], i["quantity"]) for i in by_region} == {("in", "2"), ("us", "1")}
    assert quantity(await usage(api, t, "gb", pos)) == "10"
    assert quantity(await usage(api, t, "peak", pos)) == "9.75"
    assert quantity(await usage(api, t, "seats", pos)) == "6"
    assert quantity(await usage(api, t, "mau", pos)) == "2"
    daily = await usage(api, t, "gb", pos, granularity="day")
    assert sum(float(i["quantity"]) for i in daily) == 10 and daily[0]["period_start"].endswith("+05:30")
    admin = await api.http.get(f"/admin/v1/organisations/{t.org}/usage", headers=AUTH,
                               params={"metric": "gb", "project_id": t.project})
    assert quantity(admin.json()["items"]) == "10"


async def test_a_max_meter_with_a_field_bills_the_property_value(api: Api, tenant: Tenant) -> None:
    t = await make_tenant(api, "field")
    r = await api.http.post(EVENTS, headers=t.auth, json={"events": [
        ev(metric="storage", properties={"gb": "42.5"}), ev(metric="storage", properties={"gb": 7})]})
    assert r.status_code == 202 and r.json() == {"accepted": 2, "duplicates": 0}, r.text
    assert quantity(await usage(api, t, "storage", r.headers["x-ledger-position"])) == "42.5"
    # A JSON fraction goes the careful way, exactly; the largest value still wins.
    r = await api.http.post(EVENTS, headers=t.auth, content=b'{"event_id": "f", "metric": "storage",'
                            b' "properties": {"gb": 99.25, "region": "in"}}')
    assert r.status_code == 202, r.text
    assert quantity(await usage(api, t, "storage", r.headers["x-ledger-position"])) == "99.25"


async def test_a_count_meter_with_a_field_is_refused(api: Api) -> None:
    head = api.rt.ledger.head()
    r = await api.http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "counted", "name": "Counted", "aggregation": "count", "field": "gb"})
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["field"]
    assert api.rt.ledger.head() == head
    schema = (await api.http.get("/schema/openapi.json")).text
    assert "properties[field]" in schema  # the meter's field is explained where clients look


@pytest.mark.parametrize(("params", "field"), [
    ({"group_by": "region"}, "group_by"), ({"metric": "gb", "granularity": "week"}, "granularity"),
    ({"metric": "calls", "group_by": "colour"}, "group_by"),
    ({"metric": "gb", "from": "2026-11-10", "to": "2026-11-01"}, "to"),
    ({"metric": "gb", "from": "soon"}, "from"), ({"metric": "gb", "limit": "0"}, "limit"),
])
async def test_bad_usage_queries_get_422(
    api: Api, tenant: Tenant, params: dict[str, str], field: str
) -> None:
    await api.http.post(EVENTS, headers=tenant.auth, json=ev(metric="gb", value="1"))
    await wait_until(lambda: api.count("usage_totals") > 0, "some usage")
    r = await api.http.get("/api/v1/usage", headers=tenant.auth, params=params)
    assert r.status_code == 422, r.text
    assert field in {e["field"] for e in r.json()["errors"]}


async def test_usage_of_unknown_organisation_is_404(api: Api) -> None:
    r = await api.http.get(f"/admin/v1/organisations/{uuid.uuid4()}/usage", headers=AUTH,
                           params={"metric": "gb"})
    assert r.status_code == 404
    r = await api.http.get("/admin/v1/organisations/nope/usage", headers=AUTH, params={"metric": "gb"})
    assert r.status_code == 422
    assert isinstance(r, httpx.Response)


async def test_a_meter_with_usage_keeps_its_aggregation_and_says_why(
    api: Api, tenant: Tenant
) -> None:
    code = f"frozen-{uuid.uuid4().hex[:8]}"
    meter = {"code": code, "name": "Frozen", "aggregation": "count"}
    assert (await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)).status_code == 201
    meter["aggregation"] = "sum"  # no usage yet: still free to change
    assert (await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)).status_code == 200
    r = await api.http.post(EVENTS, headers=tenant.auth, json=ev(metric=code, value=3))
    assert r.status_code == 202, r.text
    head = api.rt.ledger.head()
    for change in ({"aggregation": "max"}, {"group_by": ["region"]}, {"field": "user"}):
        refused = await api.http.post("/admin/v1/meters", headers=AUTH, json=meter | change)
        assert refused.status_code == 409, (change, refused.text)
        assert "already has usage" in refused.json()["detail"]
    assert api.rt.ledger.head() == head  # nothing was recorded
    renamed = await api.http.post("/admin/v1/meters", headers=AUTH, json=meter | {"name": "F2"})
    assert renamed.status_code == 200 and renamed.json()["aggregation"] == "sum"
