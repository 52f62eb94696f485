"""Issue 21, the reference: the OpenAPI document a client can be generated from, the docs page
that works offline, and the 422 for a query parameter a route does not take. Over real HTTP,
one service for the module; every route comes from api/permissions.py or the document itself,
so routes added later are covered without touching this file."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from adapters.ledger import LEDGER_NAME
from api.permissions import RULES
from api.reference import ADMIN_TOKEN, API_KEY, QUERY
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio

PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
METHODS = ("get", "put", "post", "delete", "patch")
# Pages Litestar renders from public CDNs: none of them may be served.
CDN_PAGES = ("redoc", "rapidoc", "elements", "scalar", "stoplight")
# Filled-in path parameters: well-formed values of their kind (most name nothing that exists).
PATH_VALUES = {"code": "no_such_code"}
EVENTS_TABLE = f"{LEDGER_NAME}_events"


async def _document(api: Api) -> dict[str, Any]:
    r = await api.http.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()
    return document


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_the_document_is_openapi_3_1_and_every_ref_resolves(api: Api) -> None:
    document = await _document(api)
    assert document["openapi"].startswith("3.1")
    errors = [f"{e.instance_path}: {e.message[:200]}"
              for e in jsonschema_rs.validator_for(OPENAPI_31).iter_errors(document)]
    assert not errors, "\n".join(errors[:20])
    schemas = document["components"]["schemas"]
    for ref in set(_refs(document)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    # The validator does look: a parameter without `in` is refused.
    broken = {**document, "paths": {"/x": {"get": {"parameters": [{"name": "a"}],
                                                   "responses": {"200": {"description": "ok"}}}}}}
    assert not jsonschema_rs.validator_for(OPENAPI_31).is_valid(broken)


async def test_every_permissioned_route_is_documented_with_its_parameters(api: Api) -> None:
    document = await _document(api)
    schemes = document["components"]["securitySchemes"]
    assert schemes[ADMIN_TOKEN] == schemes[ADMIN_TOKEN] | {"type": "http", "scheme": "bearer",
                                                           "bearerFormat": "bt_..."}
    assert schemes[API_KEY] == schemes[API_KEY] | {"type": "http", "scheme": "bearer",
                                                   "bearerFormat": "bk_..."}
    assert document["components"]["schemas"]["Problem"]["required"] == [
        "type", "title", "status", "detail"]
    for method, template in RULES:
        op = document["paths"].get(template, {}).get(method.lower())
        assert op is not None, f"{method} {template} is not in the OpenAPI document"
        params = {(p["name"], p["in"]): p for p in op.get("parameters", [])}
        for name in PATH_PARAM.findall(template):
            assert params.get((name, "path"), {}).get("required") is True, (method, template, name)
        for query in QUERY.get((method, template), ()):
            documented = params.get((query.name, "query"))
            assert documented is not None, f"{method} {template}: ?{query.name} is not documented"
            assert documented["schema"] and documented["description"]
        assert op["security"] == [{ADMIN_TOKEN: []}], (method, template)
        for status in ("401", "403", "422"):
            content = op["responses"][status]["content"]
            assert content == {"application/problem+json": {
                "schema": {"$ref": "#/components/schemas/Problem"}}}, (method, template, status)
        assert any(s.startswith("2") for s in op["responses"]), (method, template)


async def test_every_route_says_who_may_call_it_and_how_it_fails(api: Api) -> None:
    document = await _document(api)
    ops = list(_operations(document))
    assert len(ops) >= len(RULES) + 5  # health, metrics, ingest, own usage, webhook
    for path, method, op in ops:
        assert "security" in op, (method, path)
        assert "422" in op["responses"], (method, path)
        if path.startswith("/api/"):
            assert op["security"] == [{API_KEY: []}]
            assert "429" in op["responses"]
    usage = {p["name"] for p in document["paths"]["/api/v1/usage"]["get"]["parameters"]
             if p["in"] == "query"}
    assert {"metric", "from", "to", "granularity", "group_by", "limit", "cursor"} <= usage
    ingest = document["paths"]["/api/v1/events"]["post"]
    body = ingest["requestBody"]["content"]["application/json"]["schema"]
    event = document["components"]["schemas"]["UsageEvent"]
    assert len(body["oneOf"]) == 2 and event["required"] == ["event_id", "metric"]
    assert ingest["security"] == [{API_KEY: []}]
    assert document["paths"]["/health/live"]["get"]["security"] == []


def _filled(template: str) -> str:
    return PATH_PARAM.sub(lambda m: PATH_VALUES.get(m.group(1), str(uuid.uuid4())), template)


async def test_a_query_parameter_a_route_does_not_take_is_a_422_naming_it_on_every_route(
        api: Api) -> None:
    document = await _document(api)
    ops = list(_operations(document))
    for method, template in RULES:  # every permissioned route is among them
        assert (template, method.lower()) in {(p, m) for p, m, _ in ops}
    head = api.count(EVENTS_TABLE)
    problem = jsonschema_rs.validator_for(document["components"]["schemas"]["Problem"])
    for path, method, _ in ops:
        r = await api.http.request(method.upper(), _filled(path), headers=AUTH,
                                   params={"start": "2026-01-01"})
        assert r.status_code == 422, f"{method.upper()} {path}: {r.status_code} {r.text[:300]}"
        assert r.headers["content-type"].startswith("application/problem+json")
        problem.validate(r.json())  # the answer has the documented problem shape
        errors = r.json()["errors"]
        assert [e["field"] for e in errors] == ["start"], (method, path, errors)
        assert "is not a query parameter of this route" in errors[0]["message"]
    assert api.count(EVENTS_TABLE) == head  # refused before anything was written


async def test_the_issue_example_and_documented_parameters(api: Api) -> None:
    r = await api.http.post("/admin/v1/organisations", headers=AUTH,
                            json={"name": "Reference Co", "billing_email": "a@b.in"})
    assert r.status_code == 201, r.text
    org = r.json()
    usage = f"/admin/v1/organisations/{org['id']}/usage"
    r = await api.http.get(usage, headers=AUTH, params={"metric": "x", "start": "2026-01-01"})
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "start" and "from" in error["message"] and "to" in error["message"]
    # Every documented parameter passes the check (its value is the handler's to judge).
    r = await api.http.get("/admin/v1/invoices", headers=AUTH, params={
        "limit": "5", "status": "draft", "period": "2026-10", "order": "newest",
        "organisation_id": org["id"], "number": "INV-2627-000001"})
    assert r.status_code == 200, r.text
    # Two unknown names, each named once; a repeated known name is not unknown, but refused too.
    r = await api.http.get("/admin/v1/organisations?limit=1&limit=2&stat=x&stat=y&sort=1",
                           headers=AUTH)
    assert r.status_code == 422, r.text
    assert sorted(e["field"] for e in r.json()["errors"]) == ["limit", "sort", "stat"]


async def test_a_query_parameter_given_twice_is_a_422_not_its_first_value(api: Api) -> None:
    # `status=draft&status=void` reads as "drafts or voids"; answering only the drafts would
    # silently ignore the second value (review of issue 21).
    r = await api.http.get("/admin/v1/invoices?status=draft&status=void", headers=AUTH)
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["field"] == "status" and "more than once" in error["message"]
    r = await api.http.get("/admin/v1/invoices?status=draft&limit=5", headers=AUTH)
    assert r.status_code == 200, r.text


async def test_the_docs_page_and_every_asset_it_references_come_from_the_service(api: Api) -> None:
    for page in ("/schema", "/schema/swagger"):
        r = await api.http.get(page)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/html")
        html = r.text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r'url: "([^"]+)"', html)
        assert len(refs) >= 4, refs  # icon, CSS, JS, the document
        for ref in refs:
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc and ref.startswith("/"), ref
            asset = await api.http.get(ref)
            assert asset.status_code == 200, (ref, asset.status_code)
            assert len(asset.content) > 500, ref
            assert asset.headers["content-type"].count("charset") <= 1, asset.headers["content-type"]
            if ref.endswith(".css"):
                # Images in the CSS are inline (data:), never fetched from elsewhere.
                assert all(u.strip("'\"").startswith("data:")
                           for u in re.findall(r"url\(([^)]*)\)", asset.text)), ref
            if ref.endswith(".js"):
                assert "SwaggerUIBundle" in asset.text and "sourceMappingURL=http" not in asset.text
        assert "https://" not in re.sub(r"<script>.*?</script>", "", html, flags=re.S)
    for cdn_page in CDN_PAGES:
        assert (await api.http.get(f"/schema/{cdn_page}")).status_code == 404, cdn_page
    for other in ("swagger-editor-bundle.js", "..%2Fcore.py", "LICENSE"):
        assert (await api.http.get(f"/schema/assets/{other}")).status_code == 404, other
