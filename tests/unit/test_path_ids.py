"""A malformed id in a path gets the API's 422 naming it, as an id in a query does; the router
(its {name:uuid} segments) refuses it before any handler, guard or database."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from api.app import create_app
from infra.wiring import build_api
from tests.unit.test_wiring import unconnected_runtime


@pytest.mark.parametrize(("method", "path", "what"), [
    ("GET", "/admin/v1/organisations/nope", "organisation"),
    ("PATCH", "/admin/v1/organisations/nope", "organisation"),
    ("GET", "/admin/v1/organisations/nope/balance", "organisation"),
    ("GET", "/admin/v1/projects/1234/api-keys", "project"),
    ("POST", "/admin/v1/api-keys/nope/rotate", "api key"),
    ("DELETE", "/admin/v1/tokens/nope", "token"),
    ("GET", "/admin/v1/invoices/nope/document", "invoice"),
])
def test_a_malformed_path_id_is_a_422_naming_it(tmp_path: Path, method: str, path: str,
                                                what: str) -> None:
    app, _ = create_app(build_api(unconnected_runtime(tmp_path), admin_token="t").deps)
    with TestClient(app) as client:
        r = client.request(method, path, json={})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"] == [{"field": "id", "message": f"{what} id must be a UUID"}]


def test_a_path_no_route_has_is_still_a_404(tmp_path: Path) -> None:
    app, _ = create_app(build_api(unconnected_runtime(tmp_path), admin_token="t").deps)
    with TestClient(app) as client:
        assert client.get("/admin/v1/nothing/nope").status_code == 404
