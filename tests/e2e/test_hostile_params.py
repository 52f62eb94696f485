"""Query parameters and headers an attacker would send (issue 20's probe): every one answers a
4xx problem+json naming what is wrong, or succeeds; none is a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes, int() says no


def _problem(r: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert field in [e["field"] for e in body.get("errors", [])], body
    return body


@pytest.mark.parametrize("path", ["/admin/v1/organisations", "/admin/v1/invoices",
                                  "/admin/v1/audit-events"])
async def test_the_documented_maximum_limit_is_served(api: Api, path: str) -> None:
    r = await api.http.get(path, headers=AUTH, params={"limit": "1000"})
    assert r.status_code == 200, r.text
    assert "items" in r.json()


@pytest.mark.parametrize("path", ["/admin/v1/organisations", "/admin/v1/invoices",
                                  "/admin/v1/audit-events"])
@pytest.mark.parametrize("limit", [SUPERSCRIPT_TWO, "\u0661\u0662", "\uff11\uff12", "+5", " 5", "1_0"])
async def test_a_limit_that_is_not_ascii_digits_is_refused(api: Api, path: str, limit: str) -> None:
    _problem(await api.http.get(path, headers=AUTH, params={"limit": limit}), 422, "limit")


@pytest.mark.parametrize("path", ["/admin/v1/organisations", "/admin/v1/invoices",
                                  "/admin/v1/audit-events"])
async def test_a_cursor_that_is_not_ours_is_refused(api: Api, path: str) -> None:
    _problem(await api.http.get(path, headers=AUTH, params={"cursor": SUPERSCRIPT_TWO}), 422, "cursor")


@pytest.mark.parametrize("position", [SUPERSCRIPT_TWO, "\u0661", "-1", "1e3"])
async def test_a_ledger_position_header_that_is_not_ascii_digits_is_refused(
    api: Api, position: str
) -> None:
    # Headers travel as bytes; servers read them as latin-1, where b"\xb2" is "²".
    latin = position.isascii() or position == SUPERSCRIPT_TWO
    raw = position.encode("latin-1") if latin else position.encode()
    r = await api.http.get("/admin/v1/organisations", headers={
        **{k.encode(): v.encode() for k, v in AUTH.items()}, b"X-Ledger-Position": raw})
    _problem(r, 422, "X-Ledger-Position")
