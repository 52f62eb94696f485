"""Admin Idempotency-Key over HTTP (docs/API.md Conventions, docs/IDEMPOTENCY.md): a retry with the
same key answers the first response and records nothing more, in the read model and in the
ledger; concurrent retries make one resource; another body or route is a 422; keys belong to
their principal; a one-time secret is never stored nor shown again; a claim left by a crash is
taken over, and the ledger tells whether the command had committed."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from adapters.idempotency import PgIdempotencyStore
from adapters.pg import open_pool
from domain.audit import (
    CURRENT_IDEMPOTENCY,
    Actor,
    AlreadyRecorded,
    IdempotentRequest,
    idempotency_seed,
)
from domain.errors import Unavailable
from domain.organisation import OrganisationSettings
from domain.services.organisations import OrganisationService
from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
IST = ZoneInfo("Asia/Kolkata")
KEYS_TABLE = "idempotency_keys"


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4()}"}


def ledger_count(api: Api, topic: str, needle: str) -> int:
    """Ledger entries of `topic` whose encoded state contains `needle` (msgpack keeps text)."""
    with api.rt.pool.connection() as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {api.rt.ledger.events_table} "
            "WHERE topic = %s AND position(convert_to(%s, 'UTF8') IN state) > 0",
            (topic, needle)).fetchone()
    assert row is not None
    return int(row[0])


async def send(api: Api, method: str, path: str, body: Any, headers: dict[str, str],
               auth: dict[str, str] = AUTH) -> httpx.Response:
    return await api.http.request(method, path, json=body, headers=auth | headers)


def same_answer(first: httpx.Response, again: httpx.Response) -> None:
    assert again.status_code == first.status_code, again.text
    assert again.json() == first.json()
    assert again.headers.get("location") == first.headers.get("location")
    assert again.headers.get("idempotent-replayed") == "true"


async def organisation(api: Api, name: str) -> str:
    r = await send(api, "POST", "/admin/v1/organisations",
                   {"name": name, "billing_email": f"ap@{name}.in"}, {})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_a_retried_organisation_creation_answers_the_first_response_and_creates_one(
        api: Api) -> None:
    name = f"idem-org-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@idem.in"}
    k = key()
    first = await send(api, "POST", "/admin/v1/organisations", body, k)
    assert first.status_code == 201, first.text
    again = await send(api, "POST", "/admin/v1/organisations", body, k)
    same_answer(first, again)
    await wait_until(lambda: api.count_where("organisations", f"name = '{name}'") >= 1, "projected")
    assert api.count_where("organisations", f"name = '{name}'") == 1
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1


async def test_two_concurrent_retries_create_one_organisation(api: Api) -> None:
    name = f"idem-race-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@race.in"}
    k = key()
    answers = await asyncio.gather(*(send(api, "POST", "/admin/v1/organisations", body, k)
                                     for _ in range(4)))
    created = [r for r in answers if r.status_code == 201]
    assert created, [r.text for r in answers]
    assert {r.json()["id"] for r in created} == {created[0].json()["id"]}
    # A retry that found the first still running is told to come back (409 + Retry-After).
    for r in answers:
        assert r.status_code == 201 or (r.status_code == 409 and "retry-after" in r.headers), r.text
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1
    await wait_until(lambda: api.count_where("organisations", f"name = '{name}'") >= 1, "projected")
    assert api.count_where("organisations", f"name = '{name}'") == 1


async def test_the_same_key_with_another_body_or_route_is_a_422_and_changes_nothing(api: Api) -> None:
    name = f"idem-body-{uuid.uuid4().hex[:8]}"
    k = key()
    first = await send(api, "POST", "/admin/v1/organisations",
                       {"name": name, "billing_email": "ap@a.in"}, k)
    assert first.status_code == 201, first.text
    other = await send(api, "POST", "/admin/v1/organisations",
                       {"name": name + "-x", "billing_email": "ap@a.in"}, k)
    assert other.status_code == 422, other.text
    assert other.headers["content-type"].startswith("application/problem+json")
    assert "Idempotency-Key" in other.json()["detail"]
    route = await send(api, "POST", f"/admin/v1/organisations/{first.json()['id']}/projects",
                       {"name": name}, k)
    assert route.status_code == 422, route.text
    assert ledger_count(api, "domain.organisation:Organisation.Created", name + "-x") == 0
    assert ledger_count(api, "domain.project:Project.Created", name) == 0


async def test_a_key_outside_1_to_255_printable_characters_is_a_422(api: Api) -> None:
    name = f"idem-len-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@a.in"}
    for bad in ("x" * 256, ""):
        r = await send(api, "POST", "/admin/v1/organisations", body, {"Idempotency-Key": bad})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "Idempotency-Key"
    ok = await send(api, "POST", "/admin/v1/organisations", body, {"Idempotency-Key": "x" * 255})
    assert ok.status_code == 201, ok.text
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1


async def test_another_principal_with_the_same_key_is_a_different_key(api: Api) -> None:
    r = await send(api, "POST", "/admin/v1/tokens", {"role": "billing_admin", "name": "second"}, {})
    assert r.status_code == 201, r.text
    other = {"Authorization": f"Bearer {r.json()['token']}"}
    name = f"idem-princ-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@p.in"}
    k = key()
    mine = await send(api, "POST", "/admin/v1/organisations", body, k)
    theirs = await send(api, "POST", "/admin/v1/organisations", body, k, auth=other)
    assert mine.status_code == theirs.status_code == 201, theirs.text
    assert mine.json()["id"] != theirs.json()["id"]
    assert "idempotent-replayed" not in theirs.headers
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 2


async def test_projects_meters_and_plans_are_created_once_per_key(api: Api) -> None:
    org = await organisation(api, f"idem-cat-{uuid.uuid4().hex[:8]}")
    project_name = f"proj-{uuid.uuid4().hex[:8]}"
    meter_code = f"idem_m_{uuid.uuid4().hex[:8]}"
    plan_code = f"idem_p_{uuid.uuid4().hex[:8]}"
    calls: list[tuple[str, dict[str, Any], str, str]] = [
        (f"/admin/v1/organisations/{org}/projects", {"name": project_name},
         "domain.project:Project.Created", project_name),
        ("/admin/v1/meters", {"code": meter_code, "name": "M", "aggregation": "count"},
         "domain.meter:Meter.Defined", meter_code),
    ]
    for path, body, topic, needle in calls:
        k = key()
        first = await send(api, "POST", path, body, k)
        assert first.status_code == 201, first.text
        same_answer(first, await send(api, "POST", path, body, k))
        assert ledger_count(api, topic, needle) == 1
    plan = {"code": plan_code, "name": "P", "charges": [
        {"metric": meter_code, "model": "per_unit", "unit_price": "1"}]}
    k = key()
    first = await send(api, "POST", "/admin/v1/plans", plan, k)
    assert first.status_code == 201, first.text
    same_answer(first, await send(api, "POST", "/admin/v1/plans", plan, k))
    assert first.json()["version"] == 1
    # Without the header, the same body publishes version 2: the key is what made it once.
    assert ledger_count(api, "domain.plan:Plan.VersionPublished", plan_code) == 0
    await wait_until(lambda: api.count_where("projects", f"name = '{project_name}'") == 1, "proj")


async def test_a_retried_key_creation_never_shows_nor_stores_the_secret_again(api: Api) -> None:
    org = await organisation(api, f"idem-key-{uuid.uuid4().hex[:8]}")
    r = await send(api, "POST", f"/admin/v1/organisations/{org}/projects", {"name": "p"}, {})
    project = r.json()["id"]
    k = key()
    path = f"/admin/v1/projects/{project}/api-keys"
    key_name = f"ci-{uuid.uuid4().hex[:8]}"
    first = await send(api, "POST", path, {"name": key_name}, k)
    assert first.status_code == 201, first.text
    secret = first.json()["key"]
    again = await send(api, "POST", path, {"name": key_name}, k)
    assert again.status_code == 201, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["key"] is None
    assert secret not in again.text
    assert again.headers["idempotency-secret-omitted"] == "key"
    assert api.count_where(KEYS_TABLE, f"position(convert_to('{secret}', 'UTF8') IN body) > 0") == 0
    assert ledger_count(api, "domain.api_key:ApiKey.Created", key_name) == 1

    k = key()
    token = await send(api, "POST", "/admin/v1/tokens", {"role": "support", "name": "t"}, k)
    assert token.status_code == 201, token.text
    again = await send(api, "POST", "/admin/v1/tokens", {"role": "support", "name": "t"}, k)
    assert again.status_code == 201 and again.json()["token"] is None, again.text
    assert again.json()["id"] == token.json()["id"]
    assert token.json()["token"] not in again.text
    assert api.count_where(
        KEYS_TABLE, f"position(convert_to('{token.json()['token']}', 'UTF8') IN body) > 0") == 0


@dataclasses.dataclass
class Used:
    """An organisation created under a key, whose stored key row a test then rewrites."""

    name: str
    body: dict[str, str]
    key: dict[str, str]
    first: httpx.Response

    async def resend(self, api: Api) -> httpx.Response:
        return await send(api, "POST", "/admin/v1/organisations", self.body, self.key)


async def used_key(api: Api, label: str, rewrite: str | None = None) -> Used:
    """Create an organisation under a fresh key; then `rewrite` its row (SET clause), if given."""
    name = f"idem-{label}-{uuid.uuid4().hex[:8]}"
    body, k = {"name": name, "billing_email": f"ap@{label}.in"}, key()
    used = Used(name, body, k, await send(api, "POST", "/admin/v1/organisations", body, k))
    assert used.first.status_code == 201, used.first.text
    if rewrite is not None:
        with api.rt.pool.connection() as conn:
            conn.execute(f"UPDATE {KEYS_TABLE} SET {rewrite} WHERE key = %s",
                         (used.key["Idempotency-Key"],))
    return used


def last_period() -> tuple[str, datetime]:
    first_of_month = datetime.now(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    late_in_last = first_of_month - timedelta(hours=6)
    return late_in_last.strftime("%Y-%m"), late_in_last


async def test_subscription_invoice_run_and_finalize_answer_the_first_response(api: Api) -> None:
    meter = f"idem_inv_{uuid.uuid4().hex[:8]}"
    plan = f"idem_plan_{uuid.uuid4().hex[:8]}"
    r = await send(api, "POST", "/admin/v1/meters", {"code": meter, "name": "I", "aggregation": "count"}, {})
    assert r.status_code == 201, r.text
    r = await send(api, "POST", "/admin/v1/plans", {"code": plan, "name": "P", "base_fee": "100",
                                                     "charges": []}, {})
    assert r.status_code == 201, r.text
    org = await organisation(api, f"idem-sub-{uuid.uuid4().hex[:8]}")
    sub_body = {"plan_code": plan, "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()}
    k = key()
    path = f"/admin/v1/organisations/{org}/subscription"
    first = await send(api, "PUT", path, sub_body, k)
    assert first.status_code == 201, first.text
    same_answer(first, await send(api, "PUT", path, sub_body, k))

    period, _ = last_period()
    k = key()
    run = await send(api, "POST", "/admin/v1/invoice-runs", {"period": period}, k)
    assert run.status_code == 200 and run.json()["created"] >= 1, run.text
    same_answer(run, await send(api, "POST", "/admin/v1/invoice-runs", {"period": period}, k))

    listed = await api.http.get("/admin/v1/invoices", headers=AUTH | {"X-Ledger-Position": "0"},
                                params={"organisation_id": org})
    (invoice,) = listed.json()["items"]
    k = key()
    path = f"/admin/v1/invoices/{invoice['id']}/finalize"
    first = await send(api, "POST", path, None, k)
    assert first.status_code == 200, first.text
    again = await send(api, "POST", path, None, k)
    same_answer(first, again)  # not the 409 "already finalized" of a retry without the key
    assert again.json()["number"] == first.json()["number"]
    assert ledger_count(api, "domain.invoice:Invoice.Finalized", first.json()["number"]) == 1


async def test_a_claim_still_running_makes_a_retry_wait_then_409_with_retry_after(api: Api) -> None:
    # As if the first were still running on a replica:
    used = await used_key(api, "busy", "status_code = NULL, claim = gen_random_uuid(), "
                          "lease_until = now() + interval '1 hour'")
    name = used.name
    busy = await used.resend(api)
    assert busy.status_code == 409, busy.text
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.headers["content-type"].startswith("application/problem+json")
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1


async def test_a_claim_left_by_a_crash_after_commit_is_answered_from_the_ledger(api: Api) -> None:
    # The process died after the commit, before it kept the answer; its lease ran out.
    used = await used_key(api, "crash", "status_code = NULL, body = NULL, claim = gen_random_uuid(), "
                          "lease_until = now() - interval '1 second'")
    name, first = used.name, used.first
    again = await used.resend(api)
    assert again.status_code == 409, again.text
    assert again.headers["idempotent-replayed"] == "recovered"
    assert {"type": "Organisation", "id": first.json()["id"]} in again.json()["targets"]
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1
    # ... and that answer is now the key's answer.
    same = await used.resend(api)
    assert same.status_code == 409 and same.json() == again.json()


async def test_a_claim_left_by_a_crash_before_commit_is_taken_over_and_runs(api: Api) -> None:
    name = f"idem-early-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@e.in"}
    seen = await send(api, "POST", "/admin/v1/organisations", body, key())
    assert seen.status_code == 201
    k = key()
    with api.rt.pool.connection() as conn:  # the same request, claimed under k, died before commit
        conn.execute(
            f"INSERT INTO {KEYS_TABLE} (principal_id, key, fingerprint, claim, lease_until, "
            "created_at, expires_at) SELECT principal_id, %s, fingerprint, gen_random_uuid(), "
            f"now() - interval '1 second', now(), expires_at FROM {KEYS_TABLE} "
            "WHERE status_code = 201 AND position(convert_to(%s, 'UTF8') IN body) > 0",
            (k["Idempotency-Key"], name))
    taken = await send(api, "POST", "/admin/v1/organisations", body, k)
    assert taken.status_code == 201, taken.text
    assert taken.json()["id"] != seen.json()["id"]
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 2


async def test_keys_expire_after_the_retention_and_expired_ones_are_purged(api: Api) -> None:
    used = await used_key(api, "old")
    k = used.key
    with api.rt.pool.connection() as conn:
        row = conn.execute(f"SELECT expires_at - created_at FROM {KEYS_TABLE} WHERE key = %s",
                           (k["Idempotency-Key"],)).fetchone()
        assert row is not None and row[0] >= timedelta(hours=24)
        conn.execute(f"UPDATE {KEYS_TABLE} SET expires_at = now() - interval '1 second' "
                     "WHERE key = %s", (k["Idempotency-Key"],))
    store = api.role.idempotency
    assert await asyncio.to_thread(store.purge_expired) >= 1
    assert api.count_where(KEYS_TABLE, f"key = '{k['Idempotency-Key']}'") == 0


async def test_an_expired_key_is_a_new_key_and_runs_again(api: Api) -> None:
    # 24 h later (not purged yet):
    used = await used_key(api, "reuse", "expires_at = now() - interval '1 second'")
    name, first = used.name, used.first
    again = await used.resend(api)
    assert again.status_code == 201, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 2
    same_answer(again, await used.resend(api))


async def test_a_refused_request_frees_its_key_for_the_corrected_request(api: Api) -> None:
    name = f"idem-fix-{uuid.uuid4().hex[:8]}"
    k = key()
    refused = await send(api, "POST", "/admin/v1/organisations", {"name": name}, k)
    assert refused.status_code == 422, refused.text
    fixed = await send(api, "POST", "/admin/v1/organisations",
                       {"name": name, "billing_email": "ap@fix.in"}, k)
    assert fixed.status_code == 201, fixed.text
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1


def test_a_second_execution_under_the_same_claim_collides_in_the_ledger_and_saves_nothing(
        api: Api) -> None:
    """The guard that holds even when the table does not (a lease that ran out while its
    holder still ran): the derived audit entry id makes the second save fail as a whole."""
    name = f"idem-twice-{uuid.uuid4().hex[:8]}"
    seed = idempotency_seed(uuid.uuid4(), "k", datetime.now(UTC))
    service = OrganisationService(api.rt.ledger, lambda: datetime.now(UTC), uuid.uuid4)

    def execute() -> Any:
        CURRENT_IDEMPOTENCY.set(IdempotentRequest(seed))
        return service.create(OrganisationSettings(name=name, billing_email="ap@twice.in"),
                              actor=Actor(uuid.uuid4(), "owner", None, "127.0.0.1", "test"))

    first = contextvars.copy_context().run(execute)
    with pytest.raises(AlreadyRecorded) as collided:
        contextvars.copy_context().run(execute)
    assert collided.value.recorded.targets == [{"type": "Organisation", "id": str(first.aggregate.id)}]
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1


async def test_a_store_that_cannot_reach_postgres_answers_503_and_runs_nothing(api: Api) -> None:
    """The middleware never runs a keyed request without its claim: 503 + Retry-After instead."""
    pool = open_pool(api.rt.database_url, api.rt.settings.pg_schema)
    pool.close()
    with pytest.raises(Unavailable):
        PgIdempotencyStore(pool, api.rt.ledger).claim(uuid.uuid4(), "k", b"fingerprint")
    store = api.role.idempotency
    assert isinstance(store, PgIdempotencyStore)
    working, store._pool = store._pool, pool  # the running API's store loses its database
    name = f"idem-down-{uuid.uuid4().hex[:8]}"
    try:
        r = await send(api, "POST", "/admin/v1/organisations",
                       {"name": name, "billing_email": "ap@d.in"}, key())
    finally:
        store._pool = working
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 0


def test_the_seed_of_a_claim_is_the_same_in_every_time_zone() -> None:
    """A takeover on a replica whose session reads created_at in another zone derives the
    same audit ids, so it finds the dead holder's commit."""
    principal, at = uuid.uuid4(), datetime(2026, 12, 6, 3, 4, 5, 678901, tzinfo=UTC)
    assert idempotency_seed(principal, "k", at) == idempotency_seed(principal, "k", at.astimezone(IST))
    assert idempotency_seed(principal, "k", at) != idempotency_seed(uuid.uuid4(), "k", at)
    assert idempotency_seed(principal, "k", at) != idempotency_seed(principal, "k2", at)


async def test_a_commit_whose_answer_was_lost_is_not_run_again_by_the_retry(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the ledger commits, the commit's answer is lost (the connection drops
    after COMMIT reached Postgres), the route answers 503; the key must not be released, or the
    retry creates the organisation a second time. The fault is injected at our ledger adapter's
    edge, after the real commit."""
    app = api.rt.ledger._app
    original = app.save
    armed = {"once": True}

    def save_then_lose_the_answer(*aggregates: Any, **kw: Any) -> Any:
        recordings = original(*aggregates, **kw)
        if armed["once"]:
            armed["once"] = False
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return recordings

    monkeypatch.setattr(app, "save", save_then_lose_the_answer)
    name = f"idem-lost-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "billing_email": "ap@idem.in"}
    k = key()
    first = await send(api, "POST", "/admin/v1/organisations", body, k)
    again = await send(api, "POST", "/admin/v1/organisations", body, k)
    assert first.status_code != 201 and again.status_code in (409, 201), (first.text, again.text)
    assert ledger_count(api, "domain.organisation:Organisation.Created", name) == 1
