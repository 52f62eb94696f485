"""The admin organisation API over real HTTP: contract shapes, read-your-writes, bad input."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
ORGS = "/admin/v1/organisations"
RAW_READ_TIMEOUT_S = 10.0


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    assert "Traceback" not in r.text
    return body


async def test_create_then_read_immediately_sees_the_write(api: Api) -> None:
    r = await api.http.post(ORGS, headers=AUTH, json={
        "name": "Acme", "billing_email": "ap@acme.in", "gstin": "29ABCDE1234F1Z5",
        "state_code": "29"})
    assert r.status_code == 201
    created = r.json()
    assert int(r.headers["x-ledger-position"]) > 0
    assert r.headers["location"] == f"{ORGS}/{created['id']}"
    got = await api.http.get(f"{ORGS}/{created['id']}", headers=AUTH)
    assert got.status_code == 200 and got.json() == created
    assert created["currency"] == "INR" and created["timezone"] == "Asia/Kolkata"


async def test_patch_changes_settings_and_reads_reflect_it(api: Api) -> None:
    org = (await api.http.post(ORGS, headers=AUTH,
                               json={"name": "Old", "billing_email": "a@b.in"})).json()
    r = await api.http.patch(f"{ORGS}/{org['id']}", headers=AUTH,
                             json={"name": "New", "state_code": "27"})
    assert r.status_code == 200 and r.json()["name"] == "New"
    got = (await api.http.get(f"{ORGS}/{org['id']}", headers=AUTH)).json()
    assert (got["name"], got["state_code"]) == ("New", "27")


async def test_list_pages_with_an_opaque_cursor(api: Api) -> None:
    for i in range(5):
        await api.http.post(ORGS, headers=AUTH, json={"name": f"p{i}", "billing_email": "a@b.in"})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (await api.http.get(ORGS, headers=AUTH, params=params)).json()
        assert len(page["items"]) <= 2
        seen += [o["id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == api.count("organisations")


async def test_request_id_is_echoed_or_minted(api: Api) -> None:
    r = await api.http.get("/health/live", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await api.http.get("/nowhere")
    _problem(r, 404)
    assert len(r.headers["x-request-id"]) == 32


async def test_metrics_and_openapi_are_served(api: Api) -> None:
    await api.http.get(ORGS, headers=AUTH)
    text = (await api.http.get("/metrics")).text
    for name in ("billing_http_requests_total", "billing_ledger_head_position",
                 "billing_relay_lag_entries", "billing_projection_lag_entries",
                 "billing_dead_letters"):
        assert name in text
    schema = (await api.http.get("/schema/openapi.json")).json()
    assert "/admin/v1/organisations" in schema["paths"]


BAD_CREATES: list[tuple[str, Any, int, set[str]]] = [
    ("wrong type", {"name": 1, "billing_email": "a@b.in"}, 422, {"name"}),
    ("missing field", {"billing_email": "a@b.in"}, 422, {"name"}),
    ("unknown field", {"name": "x", "billing_email": "a@b.in", "plan": "gold"}, 422, {"plan"}),
    ("not an object", [1, 2], 422, {"body"}),
    ("null name", {"name": None, "billing_email": "a@b.in"}, 422, {"name"}),
    ("rule breaks", {"name": "x", "billing_email": "no", "currency": "USD"}, 422,
     {"billing_email", "currency"}),
    ("gstin of another state", {"name": "x", "billing_email": "a@b.in",
                                "gstin": "29ABCDE1234F1Z5", "state_code": "07"}, 422, {"gstin"}),
    ("overlong name", {"name": "x" * 500, "billing_email": "a@b.in"}, 422, {"name"}),
]


@pytest.mark.parametrize(("case", "body", "status", "fields"), BAD_CREATES,
                         ids=[c[0] for c in BAD_CREATES])
async def test_bad_create_gets_a_problem_and_changes_nothing(
    api: Api, case: str, body: Any, status: int, fields: set[str]
) -> None:
    head = api.rt.ledger.head()
    problem = _problem(await api.http.post(ORGS, headers=AUTH, json=body), status)
    assert {e["field"] for e in problem["errors"]} == fields, case
    assert api.rt.ledger.head() == head


async def test_malformed_json_and_huge_bodies_are_refused(api: Api) -> None:
    head = api.rt.ledger.head()
    _problem(await api.http.post(ORGS, headers=AUTH, content=b"{nope"), 400)
    huge = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'", "billing_email": "a@b.in"}'
    _problem(await api.http.post(ORGS, headers=AUTH, content=huge), 413)
    assert api.rt.ledger.head() == head


async def test_unknown_and_malformed_ids(api: Api) -> None:
    head = api.rt.ledger.head()
    _problem(await api.http.get(f"{ORGS}/{uuid.uuid4()}", headers=AUTH), 404)
    _problem(await api.http.patch(f"{ORGS}/{uuid.uuid4()}", headers=AUTH, json={"name": "x"}), 404)
    bad = _problem(await api.http.get(f"{ORGS}/not-a-uuid", headers=AUTH), 422)
    assert bad["errors"][0]["field"] == "id"
    _problem(await api.http.patch(f"{ORGS}/{uuid.uuid4()}", headers=AUTH, json={}), 422)
    _problem(await api.http.get(ORGS, headers=AUTH, params={"limit": "5000"}), 422)
    _problem(await api.http.get(ORGS, headers=AUTH, params={"cursor": "garbage!"}), 422)
    assert api.rt.ledger.head() == head


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic abc", "Bearer"])
async def test_missing_or_invalid_token_is_401_and_changes_nothing(
    api: Api, header: str | None
) -> None:
    head = api.rt.ledger.head()
    headers = {"Authorization": header} if header is not None else {}
    r = await api.http.post(ORGS, headers=headers, json={"name": "x", "billing_email": "a@b.in"})
    _problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    _problem(await api.http.get(ORGS, headers=headers), 401)
    assert api.rt.ledger.head() == head


async def _raw_exchange(api: Api, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    host, port = str(api.http.base_url.host), int(api.http.base_url.port or 80)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), RAW_READ_TIMEOUT_S)  # until EOF
    finally:
        writer.close()



async def test_pipelined_and_closing_requests_get_whole_responses(api: Api) -> None:
    """Responses leave in one write per loop step (infra/http_protocol.py): pipelined requests
    each get their whole answer, and Connection: close sends the answer before closing."""
    get = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    close = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await _raw_exchange(api, get + get + close)
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, data
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"200 "), answer
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        assert len(body) == length, answer
