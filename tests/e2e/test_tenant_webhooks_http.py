"""Tenant webhooks end to end (docs/WEBHOOKS.md): a running service (API, relay, workers) sends
signed deliveries to real HTTP receivers on 127.0.0.1, verified with the README's own code.

One set of ledger facts (an invoice finalized and paid, another finalized and voided, a payment
that failed) goes to four endpoints: `good` answers 200; `flaky` answers 500 at first, then
recovers; `down` always answers 500 until it is dead-lettered, then is re-sent; `dropped` is
deleted while its deliveries are still failing. The workers' sender runs on the test's clock
(Runtime.webhook_clock), and the test runs passes of its own on it: the test moves the clock
through the retries, and no test sleeps for a backoff."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import anyio.to_thread
import httpx
import pytest

from adapters.destinations import DestinationGuard
from adapters.maintenance import rebuild
from adapters.tenant_webhooks import TenantWebhookSender
from api.app import create_app
from api.webhook_endpoints import ENDPOINTS_PER_ORGANISATION_MAX
from domain.gateway_events import PaymentEntity, webhook_body
from domain.payment import PaymentOrder
from domain.services.webhooks import WebhooksService
from domain.tenant_webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER
from infra.embedded import free_port
from infra.wiring import Runtime, admin_token, build_api, new_webhook_secret
from projections.webhook_endpoints import READ_MODEL
from tests.conftest import http_status, make_settings, running, wait_until
from tests.e2e.conftest import AUTH, Api, close_and_drop
from tests.e2e.test_invoicing_http import last_period

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parents[2] / "README.md"
ENDPOINTS = ("good", "flaky", "down", "dropped")
ALL_EVENTS = ["invoice.finalized", "invoice.paid", "invoice.voided", "payment.failed"]
EXPECTED = ["invoice.finalized", "invoice.finalized", "invoice.paid", "invoice.voided",
            "payment.failed"]
FLAKY_FAILURES = 7  # `flaky` answers 500 this often, then 200
CLOCK_STEP = timedelta(hours=1)  # the test clock moves this far between sender passes
PASSES_MAX = 40  # more than 24 h of hourly passes


def readme_verify() -> Callable[..., bool]:
    """The `verify` of the README's "Receiving webhooks" section, run as written."""
    section = README.read_text().split("## Receiving webhooks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README's Receiving webhooks section has no Python example"
    assert len(code.group(1).strip().splitlines()) <= 10, "the example is ten lines at most"
    scope: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), scope)
    verify: Callable[..., bool] = scope["verify"]
    return verify


def signed_at(r: Received) -> int:
    """The `t` of a delivery's signature."""
    return int(dict(p.split("=", 1) for p in r.headers[SIGNATURE_HEADER].split(","))["t"])


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receivers:
    """Real HTTP receivers on 127.0.0.1: one server, a path per endpoint, each answering the
    statuses planned for it (then 200)."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.plans: dict[str, list[int]] = {}
        self.always: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                name = self.path.strip("/")
                with outer.lock:
                    plan = outer.plans.get(name)
                    status = plan.pop(0) if plan else outer.always.get(name, 200)
                    outer.got.append(Received(name, dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def received(self, name: str, *, ok: bool | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == name
                    and (ok is None or (200 <= r.status < 300) == ok)]


@dataclasses.dataclass
class Hooks:
    api: Api
    receivers: Receivers
    org: str
    other_org: str
    endpoints: dict[str, dict[str, Any]]  # name -> the registration's answer (with its secret)
    offset: list[timedelta]

    def clock(self) -> datetime:
        return datetime.now(UTC) + self.offset[0]

    def sender(self) -> TenantWebhookSender:
        """A sender on the test clock, driven by the test (the workers' runs beside it)."""
        return TenantWebhookSender(self.api.rt.pool, DestinationGuard(allow_private=True),
                                   self.clock)

    async def deliveries(self, **params: str) -> list[dict[str, Any]]:
        r = await self.api.http.get(f"/admin/v1/organisations/{self.org}/webhook-deliveries",
                                    headers=AUTH, params=params)
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items


async def ok(r: httpx.Response, status: int = 201) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    rec = Receivers()
    rec.thread.start()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


async def _invoices(http: httpx.AsyncClient) -> tuple[str, str, list[dict[str, Any]]]:
    """Two organisations; the first gets two draft invoices (last month and the one before)."""
    await ok(await http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "hook_api", "name": "API", "aggregation": "count"}))
    await ok(await http.post("/admin/v1/plans", headers=AUTH, json={
        "code": "hooks", "name": "Hooks", "base_fee": "500", "minimum": "0",
        "charges": [{"metric": "hook_api", "model": "per_unit", "unit_price": "0.01"}]}))
    orgs = []
    for name in ("tenant", "other"):
        org = (await ok(await http.post("/admin/v1/organisations", headers=AUTH, json={
            "name": name, "billing_email": f"ap@{name}.in", "state_code": "29"})))["id"]
        orgs.append(org)
    await ok(await http.put(f"/admin/v1/organisations/{orgs[0]}/subscription", headers=AUTH, json={
        "plan_code": "hooks", "starts_at": (datetime.now(UTC) - timedelta(days=100)).isoformat()}))
    period, late = last_period()
    before = (late.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    for p in (before, period):
        await ok(await http.post("/admin/v1/invoice-runs", headers=AUTH, json={"period": p}), 200)
    drafts = (await ok(await http.get("/admin/v1/invoices", headers=AUTH,
                                      params={"organisation_id": orgs[0]}), 200))["items"]
    assert len(drafts) == 2, drafts
    return orgs[0], orgs[1], drafts


@pytest.fixture(scope="module")
async def hooks(tmp_path_factory: pytest.TempPathFactory, server_urls: tuple[str, str],
                receivers: Receivers) -> AsyncIterator[Hooks]:
    settings = make_settings(Path(tmp_path_factory.mktemp("hooks")), port=free_port(),
                             webhooks_allow_private=True)
    rt = Runtime.open(settings, *server_urls)
    offset = [timedelta(0)]  # the test clock: the wall clock moved by this much
    rt.webhook_clock = lambda: datetime.now(UTC) + offset[0]  # the workers' sender's clock
    role = build_api(rt, admin_token=admin_token(settings))
    base = f"http://127.0.0.1:{settings.port}"
    receivers.plans["flaky"] = [500] * FLAKY_FAILURES
    receivers.always.update({"down": 500, "dropped": 503})
    try:
        async with running(rt, {"api", "relay", "project"}, api=role), \
                httpx.AsyncClient(base_url=base, timeout=10) as http:
            await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "up")
            org, other, drafts = await _invoices(http)
            endpoints = {}
            for name in ENDPOINTS:
                endpoints[name] = await ok(await http.post(
                    f"/admin/v1/organisations/{org}/webhook-endpoints", headers=AUTH,
                    json={"url": f"{receivers.url}/{name}", "events": ALL_EVENTS}))
            hooks = Hooks(Api(http, rt, role), receivers, org, other, endpoints, offset)
            await _facts(hooks, drafts)
            yield hooks
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, rt)


async def _facts(hooks: Hooks, drafts: list[dict[str, Any]]) -> None:
    """The ledger facts every endpoint hears of: invoice A finalized and paid in full; invoice
    B finalized and voided; a payment of B failed at the gateway."""
    http, rt = hooks.api.http, hooks.api.rt
    paid, voided = drafts
    for draft in drafts:
        await ok(await http.post(f"/admin/v1/invoices/{draft['id']}/finalize", headers=AUTH), 200)
    due = (await ok(await http.get(f"/admin/v1/invoices/{paid['id']}", headers=AUTH), 200))
    await ok(await http.post(f"/admin/v1/invoices/{paid['id']}/payments", headers=AUTH, json={
        "amount": due["amount_due"], "method": "bank_transfer", "reference": "UTR 42"}))
    await ok(await http.post(f"/admin/v1/invoices/{voided['id']}/void", headers=AUTH,
                             json={"reason": "issued in error"}), 200)

    def failed_payment() -> None:  # as a verified Razorpay webhook records it
        order = PaymentOrder.record(
            invoice_id=UUID(voided["id"]),
            organisation_id=UUID(hooks.org), razorpay_order_id="order_hooks1",
            amount=100, currency="INR", receipt="hooks", at=datetime.now(UTC))
        rt.ledger.save(order, actor=None)
        rt.payments().record_delivery(event_id="evt_hooks_failed", body=webhook_body(
            "payment.failed", payment=PaymentEntity(
                id="pay_hooks1", amount=100, currency="INR", status="failed",
                order_id="order_hooks1", method="card", error_description="card declined")))

    await anyio.to_thread.run_sync(failed_payment)
    # Every endpoint's outbox rows are written (the projector's work), whatever was sent yet.
    await wait_until(lambda: hooks.api.count("webhook_deliveries") == len(EXPECTED) * len(ENDPOINTS),
                     "the outbox holds every delivery")


async def test_a_receiver_gets_every_event_exactly_as_signed(hooks: Hooks) -> None:
    verify = readme_verify()
    secret = hooks.endpoints["good"]["secret"]
    got = await wait_until(lambda: len(r := hooks.receivers.received("good")) >= len(EXPECTED)
                           and r, "every event at the good receiver")
    assert sorted(json.loads(r.body)["type"] for r in got) == EXPECTED
    for r in got:
        body = json.loads(r.body)
        assert verify(secret, r.headers[SIGNATURE_HEADER], r.body), r.headers
        assert body["id"] == r.headers[EVENT_ID_HEADER]
        assert r.headers["Host"] == hooks.receivers.url.removeprefix("http://")
        assert body["organisation_id"] == hooks.org
        assert not verify(hooks.endpoints["flaky"]["secret"], r.headers[SIGNATURE_HEADER], r.body)
        assert not verify(secret, r.headers[SIGNATURE_HEADER], r.body.replace(b"INR", b"USD"))
    assert len({json.loads(r.body)["id"] for r in got}) == len(EXPECTED)
    assert hooks.api.count_where("projection_dead_letters", f"name = '{READ_MODEL.name}'") == 0
    by_type = {json.loads(r.body)["type"]: json.loads(r.body)["data"] for r in got}
    assert by_type["invoice.paid"]["amount_due"] == 0
    assert by_type["invoice.voided"]["reason"] == "issued in error"
    assert by_type["payment.failed"]["reason"] == "card declined"
    assert re.fullmatch(r"INV/\d{4}/\d{6}", by_type["invoice.paid"]["number"] or "")
    await wait_until(lambda: hooks.api.count_where("webhook_deliveries", "status = 'delivered' AND"
                                                   f" endpoint_id = '{hooks.endpoints['good']['id']}'")
                     == len(EXPECTED), "the sender recorded what it sent")
    good = await hooks.deliveries(endpoint_id=hooks.endpoints["good"]["id"])
    assert {d["status"] for d in good} == {"delivered"} and len(good) == len(EXPECTED)

    # A replay of a genuine delivery, later than the tolerance: refused by its timestamp.
    replay = got[0]
    t = signed_at(replay)
    assert verify(secret, replay.headers[SIGNATURE_HEADER], replay.body, now=t + 299)
    assert not verify(secret, replay.headers[SIGNATURE_HEADER], replay.body, now=t + 301)


async def test_failing_receivers_are_retried_dead_lettered_deleted_and_resent(hooks: Hooks) -> None:
    verify = readme_verify()
    sender = hooks.sender()
    dropped = hooks.endpoints["dropped"]
    # `dropped` fails until it is deleted: then nothing more goes to it.
    await wait_until(lambda: hooks.api.count_where(
        "webhook_deliveries", f"endpoint_id = '{dropped['id']}' AND attempts > 0") == len(EXPECTED),
        "a first attempt of each delivery to dropped")
    hooks.offset[0] = -CLOCK_STEP  # from now on, nothing is due for the workers' sender until moved
    r = await hooks.api.http.delete(
        f"/admin/v1/organisations/{hooks.org}/webhook-endpoints/{dropped['id']}", headers=AUTH)
    assert r.status_code == 204, r.text
    sent_to_dropped = len(hooks.receivers.received("dropped"))
    listed = (await ok(await hooks.api.http.get(
        f"/admin/v1/organisations/{hooks.org}/webhook-endpoints", headers=AUTH), 200))["items"]
    assert dropped["id"] not in {e["id"] for e in listed} and "secret" not in listed[0]

    for _ in range(PASSES_MAX):
        hooks.offset[0] += CLOCK_STEP
        await sender.send_due()
        down = await hooks.deliveries(endpoint_id=hooks.endpoints["down"]["id"])
        if all(d["status"] == "dead" for d in down):
            break
    # `flaky` recovered: every event arrived, signed, despite its 500s (at least once: a repeat
    # would carry the same id).
    flaky = hooks.receivers.received("flaky", ok=True)
    arrived = {json.loads(r.body)["id"]: json.loads(r.body)["type"] for r in flaky}
    assert sorted(arrived.values()) == EXPECTED
    # (each signed at its own moment of the test clock: verified as received then)
    assert all(verify(hooks.endpoints["flaky"]["secret"], r.headers[SIGNATURE_HEADER], r.body,
                      now=signed_at(r)) for r in flaky)
    assert len(hooks.receivers.received("flaky", ok=False)) == FLAKY_FAILURES
    # `down` is dead-lettered after 24 h of attempts, and listed so.
    down = await hooks.deliveries(endpoint_id=hooks.endpoints["down"]["id"])
    assert {(d["status"], d["dead_lettered"], d["next_attempt_at"]) for d in down} == {
        ("dead", True, None)}
    assert all(d["attempts"] > 10 and d["last_status_code"] == 500 for d in down)
    dead = await hooks.deliveries(status="dead")
    assert {d["id"] for d in dead} == {d["id"] for d in down}
    metrics = (await hooks.api.http.get("/metrics")).text
    assert f"billing_webhook_deliveries_dead {float(len(dead))}" in metrics
    # Deleted: its pending deliveries cancelled, and nothing more sent.
    assert len(hooks.receivers.received("dropped")) == sent_to_dropped
    assert {d["status"] for d in await hooks.deliveries(endpoint_id=dropped["id"])} == {"cancelled"}

    # Re-sent once `down` is back: delivered, signed like the first.
    hooks.receivers.always["down"] = 200
    hooks.offset[0] = -CLOCK_STEP  # the re-send is due now: not yet for the workers' sender
    target = down[0]
    r = await hooks.api.http.post(f"/admin/v1/organisations/{hooks.org}/webhook-deliveries/"
                                  f"{target['id']}/resend", headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    # A sender that may not call private addresses refuses it at send time...
    strict = TenantWebhookSender(hooks.api.rt.pool, DestinationGuard(allow_private=False),
                                 lambda: datetime.now(UTC) + CLOCK_STEP)
    assert (await strict.send_due()).failed == 1
    refused = next(d for d in await hooks.deliveries(endpoint_id=hooks.endpoints["down"]["id"])
               if d["id"] == target["id"])
    assert "loopback" in (refused["last_error"] or ""), refused
    assert not hooks.receivers.received("down", ok=True)
    # ...and the operator's one delivers it (this test's pass, or the workers').
    hooks.offset[0] = 2 * CLOCK_STEP
    await sender.send_due()
    got = await wait_until(lambda: hooks.receivers.received("down", ok=True), "the re-send")
    assert len(got) == 1 and json.loads(got[0].body)["id"] == target["event_id"]
    assert verify(hooks.endpoints["down"]["secret"], got[0].headers[SIGNATURE_HEADER],
                  got[0].body, now=signed_at(got[0]))

    # (the sender records what it sent right after the answer)
    await wait_until(lambda: hooks.api.count_where(
        "webhook_deliveries", f"id = '{target['id']}' AND status = 'delivered'"), "recorded")
    after = next(d for d in await hooks.deliveries() if d["id"] == target["id"])
    assert after["status"] == "delivered" and after["dead_lettered"] is False

    # A rebuild of the read model writes no delivery twice and sends nothing again.
    before, requests = await hooks.deliveries(), len(hooks.receivers.got)
    await anyio.to_thread.run_sync(rebuild, hooks.api.rt.pool, hooks.api.rt.ledger, READ_MODEL)
    hooks.offset[0] += CLOCK_STEP
    await sender.send_due()
    assert await hooks.deliveries() == before and len(hooks.receivers.got) == requests


async def test_a_private_destination_is_refused_with_the_setting_off(hooks: Hooks) -> None:
    rt = hooks.api.rt
    strict = WebhooksService(rt.ledger, lambda: datetime.now(UTC), uuid4,
                             new_webhook_secret, DestinationGuard(allow_private=False))
    _, app = create_app(dataclasses.replace(hooks.api.role.deps, webhooks=strict))
    head = rt.ledger.head()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
                                 base_url="http://testserver") as http:
        for url, reason in ((f"{hooks.receivers.url}/good", "loopback"),
                            ("http://10.1.2.3/hook", "private"),
                            ("http://169.254.169.254/latest/meta-data", "link-local"),
                            ("http://[::1]:8080/hook", "loopback"),
                            ("http://0.0.0.0/hook", "unspecified")):
            r = await http.post(f"/admin/v1/organisations/{hooks.org}/webhook-endpoints",
                                headers=AUTH, json={"url": url, "events": ["invoice.paid"]})
            assert r.status_code == 422, r.text
            assert reason in r.text and "BILLING_WEBHOOKS_ALLOW_PRIVATE" in r.text, r.text
    assert rt.ledger.head() == head


async def test_other_tenants_get_404_and_bad_input_changes_nothing(hooks: Hooks) -> None:
    http, rt = hooks.api.http, hooks.api.rt
    tokens = {}
    for org in (hooks.org, hooks.other_org):
        tokens[org] = {"Authorization": "Bearer " + (await ok(await http.post(
            "/admin/v1/tokens", headers=AUTH,
            json={"role": "org_admin", "name": "hooks", "organisation_id": org})))["token"]}
    other = tokens[hooks.other_org]
    good = hooks.endpoints["good"]
    delivery = (await hooks.deliveries(endpoint_id=good["id"]))[0]
    mine = f"/admin/v1/organisations/{hooks.org}"
    theirs = f"/admin/v1/organisations/{hooks.other_org}"
    head = rt.ledger.head()
    for method, path, body in (
            ("GET", f"{mine}/webhook-endpoints", None),
            ("POST", f"{mine}/webhook-endpoints", {"url": "https://example.com/h",
                                                    "events": ["invoice.paid"]}),
            ("DELETE", f"{mine}/webhook-endpoints/{good['id']}", None),
            ("GET", f"{mine}/webhook-deliveries", None),
            ("POST", f"{mine}/webhook-deliveries/{delivery['id']}/resend", None),
            # through its own organisation's path, another's endpoint or delivery is unknown too
            ("DELETE", f"{theirs}/webhook-endpoints/{good['id']}", None),
            ("POST", f"{theirs}/webhook-deliveries/{delivery['id']}/resend", None)):
        r = await http.request(method, path, headers=other, json=body)
        assert r.status_code == 404, (method, path, r.text)
    unknown = "/admin/v1/organisations/00000000-0000-4000-8000-000000000000/webhook-endpoints"
    assert (await http.get(unknown, headers=AUTH)).status_code == 404
    assert (await http.post(unknown, headers=AUTH, json={
        "url": "https://example.com/h", "events": ["invoice.paid"]})).status_code == 404
    for bad in ({"url": "ftp://example.com/h", "events": ["invoice.paid"]},
                {"url": "not a url", "events": ["invoice.paid"]},
                {"url": "https://user:pw@example.com/h", "events": ["invoice.paid"]},
                {"url": "https://example.com/h", "events": ["invoice.eaten"]},
                {"url": "https://example.com/h", "events": []},
                {"url": "https://example.com/h", "events": ["invoice.paid", "invoice.paid"]},
                {"url": "https://example.com/h"},
                {"url": "https://example.com/h", "events": ["invoice.paid"], "extra": 1},
                {"url": 7, "events": ["invoice.paid"]}):
        r = await http.post(f"{mine}/webhook-endpoints", headers=AUTH, json=bad)
        assert 400 <= r.status_code < 500 and r.status_code != 404, (bad, r.text)
    for params in ({"status": "lost"}, {"endpoint_id": "nope"}, {"limit": "0"}):
        r = await http.get(f"{mine}/webhook-deliveries", headers=AUTH, params=params)
        assert r.status_code == 422, (params, r.text)
    assert rt.ledger.head() == head
    # Its own organisation's org_admin may register (the secret shown once) and list.
    r = await http.post(f"{mine}/webhook-endpoints", headers=tokens[hooks.org], json={
        "url": f"{hooks.receivers.url}/own", "events": ["invoice.voided"]})
    created = await ok(r)
    assert created["secret"].startswith("whsec_") and r.headers["cache-control"] == "no-store"
    listed = (await ok(await http.get(f"{mine}/webhook-endpoints", headers=tokens[hooks.org]),
                       200))["items"]
    assert created["id"] in {e["id"] for e in listed}
    assert all("secret" not in e for e in listed)
    # A replay under the same Idempotency-Key does not show the secret again.
    again = {"Idempotency-Key": "hooks-own-1"} | tokens[hooks.org]
    body = {"url": f"{hooks.receivers.url}/own2", "events": ["invoice.paid"]}
    first = await ok(await http.post(f"{mine}/webhook-endpoints", headers=again, json=body))
    replay = await http.post(f"{mine}/webhook-endpoints", headers=again, json=body)
    assert replay.status_code == 201 and replay.json()["id"] == first["id"], replay.text
    assert first["secret"] and replay.json()["secret"] is None
    assert replay.headers["idempotency-secret-omitted"] == "secret"
    # The secret is not in the audit trail.
    audit = await http.get("/admin/v1/audit-events", headers=AUTH)
    assert audit.status_code == 200 and created["secret"] not in audit.text
    assert "WebhookEndpoint" in audit.text


async def test_an_organisation_holds_a_bounded_number_of_endpoints(hooks: Hooks) -> None:
    http, path = hooks.api.http, f"/admin/v1/organisations/{hooks.other_org}/webhook-endpoints"
    body = {"url": f"{hooks.receivers.url}/many", "events": ["invoice.paid"]}
    for _ in range(ENDPOINTS_PER_ORGANISATION_MAX):
        await ok(await http.post(path, headers=AUTH, json=body))
    head = hooks.api.rt.ledger.head()
    r = await http.post(path, headers=AUTH, json=body)
    assert r.status_code == 422 and "delete one first" in r.text, r.text
    assert hooks.api.rt.ledger.head() == head
