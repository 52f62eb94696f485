"""Issue 20, items 1-3: nothing a tenant sends can stop its own invoicing. The exact requests of
the probe, over real HTTP against the running service (API, relay and projectors): a control
character or a lone surrogate in any string, numbers written in other digits, bodies that are
not JSON by content type, duplicate keys and deep nesting are refused (4xx problem+json naming
the field) and store nothing; so no read model ever dead-letters what the API accepted."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api
from tests.e2e.test_ingest_http import Tenant, make_tenant

pytestmark = pytest.mark.anyio
EVENTS = "/api/v1/events"
METERS = [
    {"code": "hi_calls", "name": "Calls", "aggregation": "count", "group_by": ["region"]},
    {"code": "hi_users", "name": "Users", "aggregation": "unique_count", "field": "user"},
    {"code": "hi_gb", "name": "GB", "aggregation": "sum"},
    {"code": "hi_disk", "name": "Disk", "aggregation": "max", "field": "gb"},
]
# Numbers that Decimal(text) reads but nobody writes: Arabic-Indic and full-width digits, an
# underscore, a plus sign, a space, and the words Decimal knows.
LENIENT_NUMBERS = ["\u0661\u0662", "\uff11\uff12", "1_000", "+5", " 5", "5 ", "NaN", "Infinity", "0x10"]
# One refused character of each kind: NUL, another C0 control, newline, DEL, a C1 control.
CONTROLS = ["\u0000", "\u0001", "\n", "\u001f", "\u007f", "\u0085"]


def _problem(r: httpx.Response, status: int, field: str | None = None,
             index: int | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    if field is not None:
        named = [(e["field"], e.get("index")) for e in body.get("errors", [])]
        assert (field, index) in named, body
    return body


@pytest.fixture(scope="module")
async def tenant(api: Api) -> Tenant:
    for meter in METERS:
        r = await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)
        assert r.status_code in (200, 201), r.text
    return await make_tenant(api, "hostile")


def _ev(**fields: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "metric": "hi_calls"} | fields


async def _post_json(api: Api, path: str, raw: bytes, headers: dict[str, str],
                     content_type: str | None = "application/json") -> httpx.Response:
    sent = headers | ({"Content-Type": content_type} if content_type else {})
    return await api.http.post(path, content=raw, headers=sent)


# ---- item 1: a NUL (or any control character) in usage -------------------------------------

@pytest.mark.parametrize("char", CONTROLS)
async def test_a_control_character_in_a_property_value_is_refused_naming_it(
    api: Api, tenant: Tenant, char: str
) -> None:
    first, second = _ev(), _ev(properties={"region": f"x{char}"})
    head = api.rt.ledger.head()
    r = await api.http.post(EVENTS, headers=tenant.auth, json={"events": [first, second]})
    _problem(r, 422, "properties.region", 1)
    assert api.rt.ledger.head() == head  # nothing of the batch is stored
    # Both event ids are still new: resent valid, both are accepted, neither is a duplicate.
    second["properties"] = {"region": "x"}
    r = await api.http.post(EVENTS, headers=tenant.auth, json={"events": [first, second]})
    assert (r.status_code, r.json()) == (202, {"accepted": 2, "duplicates": 0}), r.text


async def test_a_nul_in_a_unique_count_value_is_refused(api: Api, tenant: Tenant) -> None:
    r = await api.http.post(EVENTS, headers=tenant.auth,
                            json=_ev(metric="hi_users", properties={"user": "u\u0000"}))
    _problem(r, 422, "properties.user", 0)


@pytest.mark.parametrize(("where", "event", "field"), [
    ("event_id", _ev(event_id="id\u0000"), "event_id"),
    ("metric", _ev(metric="hi_calls\u0000"), "metric"),
    ("property key", _ev(properties={"reg\u0000ion": "in"}), "properties.reg\ufffdion"),
    ("lone high surrogate", _ev(properties={"region": "\ud800"}), "properties.region"),
    ("lone low surrogate", _ev(properties={"region": "a\udc00b"}), "properties.region"),
])
async def test_every_string_of_an_event_is_checked(
    api: Api, tenant: Tenant, where: str, event: dict[str, Any], field: str
) -> None:
    # Encoded by json.dumps: httpx's json= would refuse to encode a lone surrogate.

    raw = json.dumps(event).encode()
    r = await _post_json(api, EVENTS, raw, tenant.auth)
    _problem(r, 422, field, 0)


async def test_a_refused_event_never_reaches_a_read_model_and_invoicing_is_not_blocked(
    api: Api, tenant: Tenant
) -> None:
    """The known ways a tenant tried to stop its invoicing: each is refused, then one valid
    event goes through, and every read model reaches it with no dead letter."""

    hostile: list[bytes] = [
        json.dumps(_ev(properties={"region": "x\u0000"})).encode(),
        json.dumps(_ev(metric="hi_users", properties={"user": "\u0000"})).encode(),
        json.dumps(_ev(event_id="\ud800")).encode(),
        json.dumps(_ev(metric="hi_gb", value="\u0661\u0662")).encode(),
        json.dumps(_ev(metric="hi_disk", properties={"gb": "\uff11\uff12"})).encode(),
        b'{"event_id": "dup", "metric": "hi_calls", "properties": {"region": "a", "region": "b\\u0000"}}',
        b'{"events": [' + b"[" * 1000 + b"]" * 1000 + b"]}",
    ]
    for raw in hostile:
        r = await _post_json(api, EVENTS, raw, tenant.auth)
        assert 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text)
    ok = await api.http.post(EVENTS, headers=tenant.auth, json=_ev(properties={"region": "in"}))
    assert ok.status_code == 202, ok.text
    position = int(ok.headers["X-Ledger-Position"])

    def caught_up() -> bool:
        with api.rt.pool.connection() as conn:
            rows = conn.execute("SELECT name, position FROM projection_tracking").fetchall()
        return bool(rows) and all(p >= position for _, p in rows)

    await wait_until(caught_up, "every read model to reach the valid event")
    assert api.count("projection_dead_letters") == 0


# ---- item 2: a NUL in a name -----------------------------------------------------------------

async def test_a_nul_in_an_organisation_name_is_refused_and_nothing_changes(api: Api) -> None:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "OrgE", "billing_email": "a@b.in"})).json()
    head = api.rt.ledger.head()
    r = await api.http.patch(f"/admin/v1/organisations/{org['id']}", headers=AUTH,
                             json={"country": "US", "name": "OrgE\u0000"})
    _problem(r, 422, "name")
    assert api.rt.ledger.head() == head
    after = (await api.http.get(f"/admin/v1/organisations/{org['id']}", headers=AUTH)).json()
    assert after["name"] == "OrgE" and after["country"] == org["country"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/admin/v1/organisations", {"name": "A\u0000", "billing_email": "a@b.in"}, "name"),
    ("/admin/v1/organisations", {"name": "A", "billing_email": "a@b.in\u0007"}, "billing_email"),
    ("/admin/v1/meters", {"code": "hi_nul", "name": "N\u0000", "aggregation": "count"}, "name"),
    ("/admin/v1/meters", {"code": "hi_nul", "name": "N", "aggregation": "count",
                          "group_by": ["a\u0000"]}, "group_by[0]"),
    ("/admin/v1/plans", {"code": "hi_plan", "name": "P\u0000", "base_fee": "1"}, "name"),
    ("/admin/v1/plans", {"code": "hi_plan", "name": "P", "base_fee": "1",
                         "charges": [{"metric": "hi_calls\u0085", "model": "per_unit",
                                      "unit_price": "1"}]}, "charges[0].metric"),
])
async def test_a_control_character_in_any_admin_body_is_refused_naming_the_field(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    head = api.rt.ledger.head()
    _problem(await api.http.post(path, headers=AUTH, json=body), 422, field)
    assert api.rt.ledger.head() == head  # nothing stored


# ---- item 3: numbers written only in ASCII digits ---------------------------------------------

@pytest.mark.parametrize("text", LENIENT_NUMBERS)
async def test_an_event_value_not_written_in_ascii_digits_is_refused(
    api: Api, tenant: Tenant, text: str
) -> None:
    r = await api.http.post(EVENTS, headers=tenant.auth,
                            json={"events": [_ev(metric="hi_gb", value="1"),
                                             _ev(metric="hi_gb", value=text)]})
    _problem(r, 422, "value", 1)


@pytest.mark.parametrize("text", LENIENT_NUMBERS)
async def test_a_meter_field_value_not_written_in_ascii_digits_is_refused(
    api: Api, tenant: Tenant, text: str
) -> None:
    r = await api.http.post(EVENTS, headers=tenant.auth,
                            json=_ev(metric="hi_disk", properties={"gb": text}))
    _problem(r, 422, "properties.gb", 0)


@pytest.mark.parametrize("text", ["12", "-0", "0.5", "12.50", "1e3", "1E-3"])
async def test_decimal_strings_in_ascii_digits_are_accepted(
    api: Api, tenant: Tenant, text: str
) -> None:
    r = await api.http.post(EVENTS, headers=tenant.auth,
                            json={"events": [_ev(metric="hi_gb", value=text),
                                             _ev(metric="hi_disk", properties={"gb": text})]})
    assert r.status_code == 202, r.text


# ---- item 3: JSON by content type, no duplicate keys, bounded depth ---------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data",
                                          "application/json; charset=latin-1"])
async def test_a_body_that_is_not_json_by_content_type_is_refused(
    api: Api, tenant: Tenant, content_type: str
) -> None:

    raw = json.dumps(_ev()).encode()
    _problem(await _post_json(api, EVENTS, raw, tenant.auth, content_type), 415)
    org = json.dumps({"name": "ct", "billing_email": "a@b.in"}).encode()
    _problem(await _post_json(api, "/admin/v1/organisations", org, AUTH, content_type), 415)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                          "application/x-www-form-urlencoded"])
async def test_json_and_the_quick_starts_curl_d_are_accepted(
    api: Api, tenant: Tenant, content_type: str | None
) -> None:
    """README's quick start posts with `curl -d`, which says application/x-www-form-urlencoded."""

    r = await _post_json(api, EVENTS, json.dumps(_ev()).encode(), tenant.auth, content_type)
    assert r.status_code == 202, r.text
    org = json.dumps({"name": "ct", "billing_email": "a@b.in"}).encode()
    r = await _post_json(api, "/admin/v1/organisations", org, AUTH, content_type)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(("raw", "field", "index"), [
    (b'{"event_id": "a", "event_id": "b", "metric": "hi_calls"}', "event_id", 0),
    (b'{"events": [{"event_id": "c", "metric": "hi_calls"}], "events": []}', "events", None),
    (b'{"events": [{"event_id": "d", "metric": "hi_calls"}, {"event_id": "e", "metric": "hi_calls",'
     b' "properties": {"region": "in", "region": "us"}}]}', "properties.region", 1),
    (b'{"events": [{"event_id": "f", "metric": "hi_gb", "value": 1, "value": 2}]}', "value", 0),
])
async def test_duplicate_keys_in_an_event_body_are_refused(
    api: Api, tenant: Tenant, raw: bytes, field: str, index: int | None
) -> None:
    _problem(await _post_json(api, EVENTS, raw, tenant.auth), 422, field, index)


async def test_duplicate_keys_in_an_admin_body_are_refused(api: Api) -> None:
    raw = b'{"name": "Shown", "name": "Stored", "billing_email": "a@b.in"}'
    _problem(await _post_json(api, "/admin/v1/organisations", raw, AUTH), 422, "name")


@pytest.mark.parametrize("path", [EVENTS, "/admin/v1/organisations", "/admin/v1/meters",
                                  "/admin/v1/plans"])
@pytest.mark.parametrize("depth", [40, 1000, 100_000])
async def test_json_nested_deeply_is_refused_not_a_500(
    api: Api, tenant: Tenant, path: str, depth: int
) -> None:
    raw = b'{"name": ' + b"[" * depth + b"]" * depth + b"}"
    auth = tenant.auth if path == EVENTS else AUTH
    _problem(await _post_json(api, path, raw, auth), 422, "body")


# ---- item 3: query and path parameters --------------------------------------------------------

@pytest.mark.parametrize(("path", "params", "field"), [
    ("/admin/v1/audit-events", {"action": "\u0000"}, "action"),
    ("/admin/v1/invoices", {"status": "draft\u0001"}, "status"),
    ("/admin/v1/organisations", {"limit": "5", "x\u0000": "1"}, "x\ufffd"),
])
async def test_a_control_character_in_a_query_parameter_is_refused(
    api: Api, path: str, params: dict[str, str], field: str
) -> None:
    _problem(await api.http.get(path, headers=AUTH, params=params), 422, field)


async def test_a_control_character_in_a_usage_metric_is_refused(api: Api, tenant: Tenant) -> None:
    r = await api.http.get("/api/v1/usage", headers=tenant.auth, params={"metric": "hi_calls\u0000"})
    _problem(r, 422, "metric")
    r = await api.http.get(f"/admin/v1/organisations/{tenant.org}/usage", headers=AUTH,
                           params={"metric": "hi_calls\u0000"})
    _problem(r, 422, "metric")


async def test_a_control_character_in_a_path_parameter_is_refused(api: Api) -> None:
    r = await api.http.get("/admin/v1/plans/%00", headers=AUTH)
    _problem(r, 422, "code")
