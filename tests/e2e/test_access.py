"""Access across real processes: two `billing api` processes, a relay and a projector on one
schema. Route x role matrix, tenant isolation (hypothesis), revocation/expiry/IP checks on
both APIs within 5 s, a rate limit shared by both, audit entries, and no secret in any log."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar, Router, get
from psycopg import sql

from api.app import check_rules
from api.permissions import ROLE_PERMISSIONS, RULES, A
from domain.access import ORG_ROLES, PRINCIPAL_ROLES
from domain.invoice import invoice_id
from domain.period import shift_period
from infra.embedded import free_port
from tests.conftest import http_status_is, wait_sync
from tests.e2e.test_invoicing_http import last_period

BOOT = "access-bootstrap-token-7f3e9a"
SECRETS: list[str] = [BOOT]


@dataclasses.dataclass
class Cluster:
    apis: list[str]
    logs: list[Path]
    schema: str

    def admin(self, token: str = BOOT, i: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.apis[i], timeout=10,
                            headers={"Authorization": f"Bearer {token}"})


@dataclasses.dataclass
class Tenant:
    org: str
    project: str
    key: str
    key_id: str
    tokens: dict[str, str]
    token_ids: dict[str, str] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def cluster(server_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"acc_{tag}", f"ACC{tag.upper()}_"
    logdir = tmp_path_factory.mktemp("access-logs")
    env = {k: v for k, v in os.environ.items()} | {
        "DATABASE_URL": server_urls[0], "NATS_URL": server_urls[1], "BILLING_PG_SCHEMA": schema,
        "BILLING_STREAM_PREFIX": prefix, "BILLING_ADMIN_TOKEN": BOOT, "LOG_LEVEL": "INFO",
        "BILLING_DATA_DIR": str(logdir)}
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    ports = [free_port(), free_port()]

    def start(role: str, port: int | None = None) -> None:
        log = logdir / f"{role}-{len(procs)}.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "infra.cli", role], env=env | ({"PORT": str(port)} if port else {}),
            stdout=subprocess.DEVNULL, stderr=log.open("wb")))

    start("relay")
    start("project")
    for port in ports:
        start("api", port)
    apis = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for api in apis:
            wait_sync(partial(http_status_is, f"{api}/health/ready", 200), f"{api} ready", 60)
        yield Cluster(apis, logs, schema)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        with psycopg.connect(server_urls[0], autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _id(r: httpx.Response) -> str:
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def make_tenant(c: Cluster, name: str) -> Tenant:
    with c.admin() as admin:
        org = _id(admin.post("/admin/v1/organisations", json={"name": name, "billing_email": "a@b.in"}))
        project = _id(admin.post(f"/admin/v1/organisations/{org}/projects", json={"name": "p"}))
        key = admin.post(f"/admin/v1/projects/{project}/api-keys", json={"name": "k"}).json()
        tokens, token_ids = {}, {}
        for role in PRINCIPAL_ROLES:
            body = {"role": role, "name": role} | ({"organisation_id": org} if role in ORG_ROLES else {})
            r = admin.post("/admin/v1/tokens", json=body)
            assert r.status_code == 201, r.text
            tokens[role], token_ids[role] = r.json()["token"], r.json()["id"]
        admin.post("/admin/v1/meters", json={"code": "req", "name": "Requests", "aggregation": "count"})
    SECRETS.extend([key["key"], *tokens.values()])
    return Tenant(org, project, key["key"], key["id"], tokens, token_ids)


@pytest.fixture(scope="module")
def tenants(cluster: Cluster) -> dict[str, Tenant]:
    return {name: make_tenant(cluster, name) for name in ("a", "b")}


def _url(template: str, t: Tenant) -> str:
    ids = {"org_id": t.org, "project_id": t.project, "key_id": str(uuid.uuid4()),
           "token_id": str(uuid.uuid4()), "invoice_id": str(uuid.uuid4()),
           "payment_id": str(uuid.uuid4()), "code": "nope"}
    ids["credit_note_id"] = str(uuid.uuid4())  # credit notes (issue 17)
    ids |= {"endpoint_id": str(uuid.uuid4()), "delivery_id": str(uuid.uuid4())}  # tenant webhooks
    ids["reconciliation_id"] = str(uuid.uuid4())  # reconciliations (issue 18)
    ids["run_id"] = str(uuid.uuid4())  # invoice runs (issue 19)
    return template.format(**ids)


def test_every_route_enforces_the_permission_table_for_every_role(
    cluster: Cluster, tenants: dict[str, Tenant]
) -> None:
    a = tenants["a"]
    checked = 0
    for (method, template), rule in sorted(RULES.items()):
        for role in PRINCIPAL_ROLES:
            scoped_global = role in ORG_ROLES and rule.scope == "GLOBAL"
            allowed = rule.permission in ROLE_PERMISSIONS[role] and not scoped_global
            with cluster.admin(a.tokens[role]) as client:
                body: dict[str, object] | None = {} if method in ("POST", "PUT", "PATCH") else None
                r = client.request(method, _url(template, a), json=body,
                                   params={"metric": "req"} if template.endswith("usage") else None)
            if allowed:
                assert r.status_code not in (401, 403), (method, template, role, r.text)
            else:
                assert r.status_code == 403, (method, template, role, r.status_code)
            checked += 1
    assert checked == len(RULES) * len(PRINCIPAL_ROLES)


def test_adding_an_admin_route_without_a_rule_fails() -> None:
    @get("/admin/v1/secret-new-thing")
    async def new_thing() -> str:
        return "x"

    with pytest.raises(RuntimeError, match="has no rule"):
        check_rules(Litestar(route_handlers=[Router(path="/", route_handlers=[new_thing])]))


SCOPED_ROUTES = [(m, t) for (m, t), r in RULES.items() if r.scope in ("ORG", "PROJECT")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(SCOPED_ROUTES), role=st.sampled_from(ORG_ROLES),
       caller=st.sampled_from(["a", "b"]), key_kind=st.booleans())
def test_no_scoped_token_reaches_another_organisation(
    cluster: Cluster, tenants: dict[str, Tenant], route: tuple[str, str], role: str, caller: str,
    key_kind: bool,
) -> None:
    me, other = tenants[caller], tenants["b" if caller == "a" else "a"]
    method, template = route
    with cluster.admin(me.tokens[role]) as client:
        r = client.request(method, _url(template, other), params={"metric": "req"},
                           json={"name": "x"} if method in ("POST", "PUT", "PATCH") else None)
        assert r.status_code in (403, 404), (method, template, role, r.text)
        if key_kind:
            # Lists show only one's own organisation.
            orgs = client.get("/admin/v1/organisations").json()["items"]
            assert [o["id"] for o in orgs] == [me.org]
            invoices = client.get("/admin/v1/invoices", params={"organisation_id": other.org})
            assert invoices.json()["items"] == []
            audit = client.get("/admin/v1/audit-events") if role == "org_admin" else None
            if audit is not None:
                assert all(e["organisation_id"] == me.org for e in audit.json()["items"])
    # An API key only ever writes and reads its own project.
    r = httpx.get(f"{cluster.apis[0]}/api/v1/usage", params={"metric": "req"},
                  headers={"Authorization": f"Bearer {me.key}"})
    assert all(i.get("project_id") == me.project for i in r.json()["items"])


def _ingest_status_is(c: Cluster, key: str, i: int, status: int) -> bool:
    return _ingest(c, key, i).status_code == status


def _limit_is(c: Cluster, key: str, i: int, burst: int) -> bool:
    limit: str | None = _ingest(c, key, i).headers.get("ratelimit-limit")
    return limit == str(burst)


def _ingest(c: Cluster, key: str, i: int, **headers: str) -> httpx.Response:
    return httpx.post(f"{c.apis[i]}/api/v1/events", timeout=10,
                      json={"event_id": uuid.uuid4().hex, "metric": "req"},
                      headers={"Authorization": f"Bearer {key}"} | headers)


def _on_both_within_5s(c: Cluster, key: str, status: int, what: str) -> None:
    started = time.monotonic()
    for i in (0, 1):
        wait_sync(partial(_ingest_status_is, c, key, i, status), f"{what} on api {i}", 5)
    assert time.monotonic() - started < 5


def test_revoked_expired_and_wrong_ip_keys_are_refused_on_both_apis(
    cluster: Cluster, tenants: dict[str, Tenant]
) -> None:
    t = make_tenant(cluster, "keys")
    with cluster.admin() as admin:
        assert _ingest(cluster, t.key, 0).status_code == 202
        assert _ingest(cluster, t.key, 1).status_code == 202
        assert admin.delete(f"/admin/v1/api-keys/{t.key_id}").status_code == 204
        _on_both_within_5s(cluster, t.key, 401, "revocation")

        soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
        expiring = admin.post(f"/admin/v1/projects/{t.project}/api-keys",
                              json={"name": "short", "expires_at": soon}).json()["key"]
        fenced = admin.post(f"/admin/v1/projects/{t.project}/api-keys",
                            json={"name": "fenced", "allowed_ips": ["10.0.0.0/8", "fd00::/8"]}).json()["key"]
        SECRETS.extend([expiring, fenced])
    for i in (0, 1):
        r = _ingest(cluster, fenced, i, **{"X-Forwarded-For": "10.1.2.3"})  # spoofing is ignored
        assert r.status_code == 403 and "not allowed" in r.json()["detail"]
    _on_both_within_5s(cluster, expiring, 401, "expiry")


def test_suspension_refuses_ingestion_on_both_apis_and_reactivation_restores_it(
    cluster: Cluster,
) -> None:
    t = make_tenant(cluster, "suspended")
    with cluster.admin() as admin:
        assert admin.patch(f"/admin/v1/organisations/{t.org}", json={"suspended": True}).status_code == 200
        _on_both_within_5s(cluster, t.key, 403, "suspension")
        assert "suspended" in _ingest(cluster, t.key, 0).json()["detail"]
        assert admin.patch(f"/admin/v1/organisations/{t.org}", json={"suspended": False}).status_code == 200
        _on_both_within_5s(cluster, t.key, 202, "reactivation")


def test_rate_limit_holds_across_both_api_processes(cluster: Cluster) -> None:
    t = make_tenant(cluster, "limited")
    per_second, burst = 2, 5
    with cluster.admin() as admin:
        r = admin.patch(f"/admin/v1/organisations/{t.org}",
                        json={"rate_limit": {"per_second": per_second, "burst": burst}})
        assert r.status_code == 200
    # The bucket is the organisation's: the requests that saw the new limit took from it too.
    seen_new: list[httpx.Response] = []

    def limit_is(i: int) -> bool:
        r = _ingest(cluster, t.key, i)
        if r.headers.get("ratelimit-limit") == str(burst):
            seen_new.append(r)
            return True
        return False

    started = time.monotonic()
    for i in (0, 1):
        wait_sync(partial(limit_is, i), "new limit seen", 5)
    # Another key of the organisation: the same bucket, whichever key sends.
    with cluster.admin() as admin:
        fresh = admin.post(f"/admin/v1/projects/{t.project}/api-keys", json={"name": "fresh"}).json()["key"]
    SECRETS.append(fresh)
    results = [_ingest(cluster, fresh, n % 2) for n in range(30)]
    elapsed = time.monotonic() - started
    accepted = [r for r in [*seen_new, *results] if r.status_code == 202]
    refused = [r for r in results if r.status_code == 429]
    assert len(results) == 30 and len(accepted) - len(
        [r for r in seen_new if r.status_code == 202]) + len(refused) == 30
    # Under the new limit, from a bucket that was full: the burst, plus what refilled meanwhile.
    assert burst - 1 <= len(accepted) <= burst + elapsed * per_second + 1
    assert refused, "30 requests in well under 15 s must outrun 2/s with a burst of 5"
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-limit"] == str(burst)
        assert r.headers["ratelimit-remaining"] == "0" and int(r.headers["ratelimit-reset"]) >= 0


def test_admin_commands_leave_an_audit_trail(cluster: Cluster, tenants: dict[str, Tenant]) -> None:
    a = tenants["a"]
    with cluster.admin(a.tokens["org_admin"]) as client:
        r = client.patch(f"/admin/v1/organisations/{a.org}", json={"name": "renamed"},
                         headers={"X-Request-Id": "audit-req-1"})
        assert r.status_code == 200
        events = client.get("/admin/v1/audit-events", params={"action": "SettingsUpdated"},
                            headers={"X-Ledger-Position": r.headers["x-ledger-position"]}).json()["items"]
    (entry,) = [e for e in events if e["request_id"] == "audit-req-1"]
    assert entry["role"] == "org_admin" and entry["source_ip"] == "127.0.0.1"
    assert entry["organisation_id"] == a.org
    assert entry["changes"][0]["after"] == {"name": "renamed"}
    assert entry["changes"][0]["before"]["name"] == "a"


def test_secrets_never_reach_logs_errors_audit_or_lists(
    cluster: Cluster, tenants: dict[str, Tenant]
) -> None:
    # Failed attempts are counted and logged (without the credential).
    bad = "bt_000000000000_this-is-a-wrong-secret"
    for i in (0, 1):
        assert httpx.get(f"{cluster.apis[i]}/admin/v1/organisations",
                         headers={"Authorization": f"Bearer {bad}"}).status_code == 401
    metrics = httpx.get(f"{cluster.apis[0]}/metrics").text
    assert 'billing_auth_failures_total{status="401"}' in metrics
    with cluster.admin() as admin:
        views = [admin.get("/admin/v1/audit-events", params={"limit": "1000"}).text,
                 admin.get(f"/admin/v1/projects/{tenants['a'].project}/api-keys").text]
    logs = [p.read_text(errors="replace") for p in cluster.logs]
    assert any("refused" in text for text in logs)
    for secret in [*SECRETS, bad]:
        # The secret part: what follows the visible prefix (bk_<prefix>_ / bt_<prefix>_).
        secret_part = secret.split("_", 2)[2] if secret[:3] in ("bk_", "bt_") else secret
        assert len(secret_part) >= 16
        for text in views + logs:
            assert secret_part not in text
    assert len(SECRETS) > 10


TAX_FACT_CHANGES: dict[str, object] = {
    "country": "US", "state_code": "27", "gstin": "27AAAPL1234C1ZV", "currency": "USD",
    "timezone": "America/New_York"}


def _settled_organisation(client: httpx.Client, org: str, barrier: httpx.Response) -> dict[str, object]:
    """The organisation as the read model has it once it includes `barrier`'s write (a later
    write by the same caller), so a refused write that had been stored anyway would show."""
    assert barrier.status_code == 200, barrier.text
    r = client.get(f"/admin/v1/organisations/{org}",
                   headers={"X-Ledger-Position": barrier.headers["x-ledger-position"]})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_an_org_admin_cannot_change_tax_facts_and_nothing_is_stored(cluster: Cluster) -> None:
    t = make_tenant(cluster, "taxes")
    with cluster.admin() as owner:
        before = owner.get(f"/admin/v1/organisations/{t.org}").json()
    with cluster.admin(t.tokens["org_admin"]) as client:
        for name, value in TAX_FACT_CHANGES.items():
            # Alone, and beside a setting the org_admin may change: the whole request is refused.
            for body in ({name: value}, {name: value, "name": "sneaky"}):
                r = client.patch(f"/admin/v1/organisations/{t.org}", json=body)
                assert r.status_code == 403, (body, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
                assert name in r.json()["detail"] and "billing_admin" in r.json()["detail"]
        r = client.patch(f"/admin/v1/organisations/{t.org}", json={"gstin": None, "country": "US"})
        assert r.status_code == 403 and "gstin" in r.json()["detail"] and "country" in r.json()["detail"]
        # What an org_admin may change, it still may; and that write is the read barrier.
        allowed = {"name": "taxes-renamed", "billing_email": "ap@taxes.in",
                   "allowed_ips": ["10.0.0.0/8"]}
        after = _settled_organisation(client, t.org, client.patch(f"/admin/v1/organisations/{t.org}",
                                                                  json=allowed))
    assert after == before | allowed | {"updated_at": after["updated_at"]}
    # The platform's billing roles may change them.
    for role, country in (("billing_admin", "US"), ("owner", "IN")):
        with cluster.admin(t.tokens[role]) as client:
            got = _settled_organisation(client, t.org, client.patch(
                f"/admin/v1/organisations/{t.org}", json={"country": country}))
        assert got["country"] == country, role


# ---- another organisation's real resources (issue 14: tests that would have caught these) -----

RESOURCE_PARAMS = ("org_id", "project_id", "key_id", "invoice_id")
CROSS_TENANT_ROUTES = sorted((m, t) for (m, t) in RULES if any(f"{{{p}}}" in t for p in RESOURCE_PARAMS))
TENANCY_PLAN = "tenancy"
SUBSCRIBED_DAYS_AGO = 130  # covers the period three months back, which has ended, grace included
# A body each write would accept if the caller were allowed: a refusal must come from the
# organisation check, never from a 422 that would hide a broken one.
VALID_BODIES: dict[tuple[str, str], dict[str, object]] = {
    ("PATCH", "/admin/v1/organisations/{org_id}"): {"name": "hijacked"},
    ("POST", "/admin/v1/organisations/{org_id}/projects"): {"name": "hijacked"},
    ("PUT", "/admin/v1/organisations/{org_id}/subscription"): {"plan_code": TENANCY_PLAN},
    ("POST", "/admin/v1/projects/{project_id}/api-keys"): {"name": "hijacked"},
    ("POST", "/admin/v1/api-keys/{key_id}/rotate"): {"overlap_s": 0},
    ("POST", "/admin/v1/invoices/{invoice_id}/void"): {"reason": "hijacked"},
}


@dataclasses.dataclass
class Invoiced:
    tenant: Tenant
    invoice: str


def _real_url(template: str, t: Invoiced) -> str:
    return template.format(org_id=t.tenant.org, project_id=t.tenant.project, key_id=t.tenant.key_id,
                           endpoint_id=uuid.uuid4(), delivery_id=uuid.uuid4(),  # tenant webhooks
                           invoice_id=t.invoice)


def _invoiced_pair(c: Cluster) -> tuple[Invoiced, Invoiced]:
    """Two fresh organisations, each with a project, an API key, usage and a draft invoice,
    every one of them visible to the read models the resolver reads."""
    a, b = make_tenant(c, "tenancy-a"), make_tenant(c, "tenancy-b")
    drafted = shift_period(last_period()[0], -2)
    starts = (datetime.now(UTC) - timedelta(days=SUBSCRIBED_DAYS_AGO)).isoformat()
    with c.admin() as owner:
        plan = {"code": TENANCY_PLAN, "name": "Tenancy", "base_fee": 500}
        r = _answered(partial(owner.post, "/admin/v1/plans", json=plan))
        assert r.status_code == 201, r.text
        for t in (a, b):
            r = owner.put(f"/admin/v1/organisations/{t.org}/subscription",
                          json={"plan_code": TENANCY_PLAN, "starts_at": starts})
            assert r.status_code == 201, r.text
            assert _ingest(c, t.key, 0).status_code == 202
        r = owner.post("/admin/v1/invoice-runs", json={"period": drafted})
        assert r.status_code == 200 and r.json()["created"] >= 2, r.text
    pair = tuple(Invoiced(t, str(invoice_id(uuid.UUID(t.org), drafted))) for t in (a, b))
    for each in pair:  # its own viewer sees each resource: the resolver knows them all
        with c.admin(each.tenant.tokens["org_viewer"]) as own:
            for path in (f"/admin/v1/invoices/{each.invoice}",
                         f"/admin/v1/projects/{each.tenant.project}/api-keys",
                         f"/admin/v1/organisations/{each.tenant.org}/usage?metric=req"):
                wait_sync(partial(_ok_with_items, own, path), f"{path} readable by its owner", 30)
    return pair[0], pair[1]


def _ok_with_items(client: httpx.Client, path: str) -> bool:
    r = client.get(path)
    return r.status_code == 200 and r.json().get("items", True) not in ([], None)


def _answered(request: Callable[[], httpx.Response]) -> httpx.Response:
    """The answer once it is not a 503: a read model that had not caught up within the API's
    read wait (a loaded machine) is asked again; a 503 records nothing, so retrying is safe."""
    answers: list[httpx.Response] = []

    def not_unavailable() -> bool:
        answers.append(request())
        return answers[-1].status_code != 503

    wait_sync(not_unavailable, "an answer other than 503", 60)
    return answers[-1]


def _snapshot(c: Cluster, t: Invoiced, barrier: str) -> dict[str, object]:
    """What another organisation's caller could have changed, read after `barrier`."""
    at = {"X-Ledger-Position": barrier}
    with c.admin() as owner:
        reads = {path: _answered(partial(owner.get, path, headers=at)) for path in (
            f"/admin/v1/organisations/{t.tenant.org}", f"/admin/v1/invoices/{t.invoice}",
            f"/admin/v1/projects/{t.tenant.project}", f"/admin/v1/projects/{t.tenant.project}/api-keys",
            f"/admin/v1/organisations/{t.tenant.org}/subscription")}
        audit = _answered(partial(owner.get, "/admin/v1/audit-events", headers=at,
                                  params={"organisation_id": t.tenant.org, "limit": "1000"}))
    assert all(r.status_code == 200 for r in [*reads.values(), audit]), reads
    return {path: r.json() for path, r in reads.items()} | {"audit": audit.json()["items"]}


def _barrier(c: Cluster, t: Tenant) -> str:
    """A write after everything before it: reads made with its position see all of those."""
    with c.admin() as owner:
        r = owner.patch(f"/admin/v1/organisations/{t.org}",
                        json={"billing_email": f"{uuid.uuid4().hex}@a.in"})
    assert r.status_code == 200, r.text
    return str(r.headers["x-ledger-position"])


def test_scoped_tokens_get_404_for_another_organisations_real_invoices_keys_and_projects(
    cluster: Cluster,
) -> None:
    me, other = _invoiced_pair(cluster)
    before = _snapshot(cluster, other, _barrier(cluster, me.tenant))
    covered = set()
    for role in ORG_ROLES:
        with cluster.admin(me.tenant.tokens[role]) as client:
            for method, template in CROSS_TENANT_ROUTES:
                rule = RULES[(method, template)]
                r = client.request(method, _real_url(template, other),
                                   json=VALID_BODIES.get((method, template), {}) if method != "GET" and
                                   method != "DELETE" else None,
                                   params={"metric": "req"} if template.endswith("/usage") else None)
                refused = rule.scope == "GLOBAL" or rule.permission not in ROLE_PERMISSIONS[role]
                assert r.status_code == (403 if refused else 404), (role, method, template, r.text)
                covered.add((method, template))
                # The same route on the caller's own resource is allowed: the 404 above is not
                # the resolver failing to find anything.
                if method == "GET" and not refused:
                    own = client.get(_real_url(template, me),
                                     params={"metric": "req"} if template.endswith("/usage") else None)
                    assert own.status_code == 200, (role, template, own.text)
            # Lists: only one's own, even when asked for the other's.
            r = client.get("/admin/v1/invoices", params={"organisation_id": other.tenant.org})
            assert r.status_code == 200 and r.json()["items"] == []
            r = client.get("/admin/v1/invoices")
            assert [i["id"] for i in r.json()["items"]] == [me.invoice]
            assert [o["id"] for o in client.get("/admin/v1/organisations").json()["items"]] == [me.tenant.org]
    invoice, key, project, org = (f"{A}/invoices/{{invoice_id}}", f"{A}/api-keys/{{key_id}}",
                                  f"{A}/projects/{{project_id}}", f"{A}/organisations/{{org_id}}")
    assert {("GET", invoice), ("GET", f"{invoice}/document"), ("POST", f"{invoice}/finalize"),
            ("POST", f"{invoice}/void"), ("DELETE", key), ("POST", f"{key}/rotate"), ("GET", project),
            ("GET", f"{project}/api-keys"), ("POST", f"{project}/api-keys"), ("GET", org),
            ("PATCH", org), ("GET", f"{org}/usage")} <= covered
    # Nothing of the other organisation changed, and the scoped tokens recorded no command.
    barrier = _barrier(cluster, me.tenant)
    assert _snapshot(cluster, other, barrier) == before
    assert _ingest(cluster, other.tenant.key, 1).status_code == 202  # its key still works
    with cluster.admin() as owner:
        for role in ORG_ROLES:
            audit = _answered(partial(owner.get, "/admin/v1/audit-events",
                                      headers={"X-Ledger-Position": barrier},
                                      params={"actor_id": me.tenant.token_ids[role]})).json()["items"]
            assert audit == [], (role, audit)
