"""The mixed workload of the multi-process tests (test_chaos, test_processes): senders of usage
with resends to every API process, an admin revoking keys and changing organisations, an invoice
run, the books of what clients saw, and the checks that compare the service with those books
after the workload."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from adapters.bookkeeping import all_tracking
from adapters.maintenance import rebuild
from infra.embedded import free_port
from infra.wiring import READ_MODELS, Runtime
from projections.base import ReadModel
from tests.conftest import http_status_is, wait_sync

DEFAULT_SEED = 14
WORKLOAD_S = 25.0
SENDERS = 4
ORGANISATIONS = 3
QUIET_TENANT = 0  # its organisation is never updated during the workload
QUIET_TENANT_KEYS = 2  # made in setup, so that one is used on both API processes by the lag
LAG_HOLD_S = 1.5  # the catalogue projector waits this long once: 3 key-cache refresh intervals
CATALOGUE, USAGE_TOTALS = "catalogue", "usage_totals"
NEW_EVENTS_PER_BATCH = 8
RESENT_EVENTS_PER_BATCH = 2
WHOLE_BATCH_RESEND_CHANCE = 0.15
BATCHES_PER_SENDER_MAX = 5000  # a bound only: WORKLOAD_S ends the load first
PROJECTOR_KILLS_MIN, PROJECTOR_KILLS_MAX = 3, 4
RESTART_DELAY_MAX_S = 1.0
ADMIN_PACE_S = 0.3
INVOICE_RUN_PACE_S = 4.0
INVOICE_RUN_HTTP_TIMEOUT_S = 40.0
HTTP_TIMEOUT_S = 10.0
# Admin commands load aggregates through the ledger's pool, whose first use after a Postgres
# restart takes ~10 s (psycopg_pool's pre-ping loop sleeps with backoff between the broken idle
# connections it meets, past its 5 s timeout, and the library retries). A client that gave up
# sooner would not know whether its command committed, and a late commit would reorder the
# admin's own commands (a suspension landing after the lift that followed it).
ADMIN_HTTP_TIMEOUT_S = 30.0
RETRY_PACE_S = 0.05
DRAIN_DEADLINE_S = 40.0
READY_DEADLINE_S = 60.0
CATCH_UP_DEADLINE_S = 90.0
REVOCATION_DEADLINE_S = 5.0
VALID_KEY_DEADLINE_S = 5.0
PROCESS_STOP_TIMEOUT_S = 30.0
ADMIN_TOKEN = "chaos-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GB, CALLS = "chaos_gb", "chaos_calls"
IST = ZoneInfo("Asia/Kolkata")
REPO_ROOT = Path(__file__).resolve().parents[2]  # where `python -m infra.cli` finds the code
ALLOW_LISTS: tuple[list[str], ...] = (["127.0.0.0/8"], ["127.0.0.1/32", "::1/128"], [])
RATE_LIMITS = ({"per_second": 2000, "burst": 4000}, {"per_second": 1500, "burst": 3000})


def last_period() -> tuple[str, datetime]:
    """The month before this one (IST) and a moment late in it, inside the 35-day window."""
    first_of_month = datetime.now(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    late_in_last = first_of_month - timedelta(hours=6)
    return late_in_last.strftime("%Y-%m"), late_in_last




# ---------------------------------------------------------------- the workload's shared state


@dataclass
class Tenant:
    org_id: str
    project_id: str
    stable_key: str  # never revoked: what a sender falls back to after a 401


@dataclass
class Key:
    id: str
    key: str
    tenant: int
    used_on: set[int] = field(default_factory=set)  # ports that answered 202 to it


@dataclass
class Batch:
    tenant: int
    events: list[dict[str, Any]]
    new_ids: int  # distinct event ids never sent before this batch
    failed_before: bool = False  # an attempt got no 202: its events may have committed anyway
    stable_key: bool = False  # a 401 answered it: the chosen key was revoked (or not yet known)


@dataclass
class Books:
    """What the clients saw: every event that got a 202 (by tenant and event_id), the keys, and
    every broken promise, for the assertions after the workload."""

    tenants: list[Tenant]
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[tuple[int, str], tuple[str, Decimal]] = field(default_factory=dict)
    live_keys: list[Key] = field(default_factory=list)
    revoking: list[Key] = field(default_factory=list)  # revoked by us; DELETE maybe not yet done
    revoked: list[Key] = field(default_factory=list)  # DELETE answered 204 (or 409: already)
    must_unsuspend: set[int] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    invoice_runs: list[str] = field(default_factory=list)
    invoice_run_ok: bool = False
    admin_log: list[str] = field(default_factory=list)  # every admin call: when, request id, answer
    began: float = field(default_factory=time.monotonic)

    def record_ack(self, batch: Batch, body: dict[str, Any], port: int, key: Key | None) -> None:
        size = len(batch.events)
        with self.lock:
            accepted, duplicates = int(body["accepted"]), int(body["duplicates"])
            if accepted + duplicates != size:
                self.violations.append(f"202 of {size} events said accepted {accepted} + "
                                       f"duplicates {duplicates}")
            if accepted > batch.new_ids or (not batch.failed_before and accepted != batch.new_ids):
                self.violations.append(
                    f"202 accepted {accepted} of a batch with {batch.new_ids} new events "
                    f"(an earlier attempt failed: {batch.failed_before}): counted twice or not at all")
            for event in batch.events:
                self.acked[(batch.tenant, event["event_id"])] = (
                    event["metric"], Decimal(event.get("value", "1")))
            if key is not None:
                key.used_on.add(port)


def event(eid: str, metric: str, value: Decimal, at: datetime | None) -> dict[str, Any]:
    out: dict[str, Any] = {"event_id": eid, "metric": metric, "value": str(value)}
    if at is not None:
        out["timestamp"] = at.isoformat()
    return out


# ---------------------------------------------------------------- the workload's threads


class Sender(threading.Thread):
    """Sends usage batches to both API processes: new events, events already acked (resent in
    a new batch, or a whole earlier batch again), one event twice in a batch. A batch without a
    202 is sent again later until it gets one; after a 401 it goes with the tenant's stable key."""

    def __init__(self, index: int, seed: int, books: Books, ports: list[int], stop: threading.Event,
                 late: datetime) -> None:
        super().__init__(name=f"sender-{index}", daemon=True)
        self.index, self.rng, self.books, self.ports = index, random.Random(seed), books, ports
        self.stop, self.late = stop, late
        self.pending: list[Batch] = []
        self.acked_batches: list[Batch] = []
        self.sent = 0
        self.finished_at = 0.0  # seconds after the workload began, when it stopped sending new
        self.http = httpx.Client(timeout=HTTP_TIMEOUT_S)
        self.error: BaseException | None = None

    def new_batch(self) -> Batch:
        tenant = self.rng.randrange(len(self.books.tenants))
        n = self.sent
        events = []
        for i in range(NEW_EVENTS_PER_BATCH):
            metric = GB if i % 2 else CALLS
            value = Decimal((n * 7 + i) % 11) + Decimal("0.25") if metric == GB else Decimal(1)
            at = self.late if self.rng.random() < 0.5 else None
            events.append(event(f"s{self.index}-b{n}-e{i}", metric, value, at))
        old = [e for b in self.acked_batches if b.tenant == tenant for e in b.events]
        events += self.rng.sample(old, min(RESENT_EVENTS_PER_BATCH, len(old)))
        events.append(dict(events[0]))  # the same event twice in one batch
        self.rng.shuffle(events)
        return Batch(tenant, events, NEW_EVENTS_PER_BATCH)

    def key_for(self, tenant: int) -> Key | None:
        with self.books.lock:
            choices = [k for k in self.books.live_keys if k.tenant == tenant]
        if choices and self.rng.random() < 0.5:
            return self.rng.choice(choices)
        return None  # the stable key

    def send(self, batch: Batch) -> bool:
        port = self.rng.choice(self.ports)
        key = None if batch.stable_key else self.key_for(batch.tenant)
        secret = key.key if key else self.books.tenants[batch.tenant].stable_key
        try:
            r = self.http.post(f"http://127.0.0.1:{port}/api/v1/events", json={"events": batch.events},
                               headers={"Authorization": f"Bearer {secret}"})
            status = str(r.status_code)
        except httpx.HTTPError as e:
            r, status = None, type(e).__name__
        with self.books.lock:
            self.books.statuses[status] += 1
        if r is not None and r.status_code == 202:
            self.books.record_ack(batch, r.json(), port, key)
            return True
        if r is not None and r.status_code == 422:
            with self.books.lock:
                self.books.violations.append(f"422 for a valid batch: {r.text[:300]}")
            return True  # never resend what is refused as invalid
        if r is not None and r.status_code == 401:
            batch.stable_key = True
        if r is None or r.status_code not in (401, 403, 429):
            batch.failed_before = True  # a 503 or a cut connection may follow a commit
        return False

    def run(self) -> None:
        try:
            while not self.stop.is_set() and self.sent < BATCHES_PER_SENDER_MAX:
                if self.pending and self.rng.random() < 0.5:
                    batch = self.pending.pop(0)
                elif self.acked_batches and self.rng.random() < WHOLE_BATCH_RESEND_CHANCE:
                    old = self.rng.choice(self.acked_batches)
                    batch = Batch(old.tenant, old.events, 0)
                else:
                    batch = self.new_batch()
                    self.sent += 1
                if self.send(batch):
                    self.acked_batches.append(batch)
                else:
                    self.pending.append(batch)
                    self.stop.wait(RETRY_PACE_S)
            self.finished_at = time.monotonic() - self.books.began
            self.drain()
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e
        finally:
            self.http.close()

    def drain(self) -> None:
        """After the workload: resend every batch that never got a 202, until it does."""
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while self.pending and time.monotonic() < deadline:
            batch = self.pending.pop(0)
            if not self.send(batch):
                self.pending.append(batch)
                time.sleep(RETRY_PACE_S)  # pacing resends, not waiting for a condition
        if self.pending:
            with self.books.lock:
                self.books.violations.append(
                    f"{self.name}: {len(self.pending)} batches got no 202 in {DRAIN_DEADLINE_S}s")


class Admin(threading.Thread):
    """Creates keys and revokes used ones, each revocation followed at once by an update of
    another organisation (the interleaving of issue 14's first defect), and PATCHes organisations
    other than QUIET_TENANT's: name, allowed_ips, rate_limit, and a suspension lifted right after.
    QUIET_TENANT's organisation is never changed, so nothing reloads a key of it that an API
    process's cache missed the revocation of."""

    def __init__(self, seed: int, books: Books, ports: list[int], stop: threading.Event,
                 pool: ConnectionPool) -> None:
        super().__init__(name="admin", daemon=True)
        self.rng, self.books, self.ports, self.stop = random.Random(seed), books, ports, stop
        self.pool = pool
        self.lag = threading.Event()  # set by the chaos schedule: revoke_while_catalogue_lags
        self.http = httpx.Client(timeout=ADMIN_HTTP_TIMEOUT_S, headers=ADMIN)
        self.renames = 0
        self.calls = 0
        self.error: BaseException | None = None

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        port = self.rng.choice(self.ports)
        self.calls += 1
        request_id = f"chaos-admin-{self.calls}"
        sent = time.monotonic() - self.books.began
        try:
            r = self.http.request(method, f"http://127.0.0.1:{port}{path}", json=body,
                                  headers={"X-Request-Id": request_id})
            answer = str(r.status_code)
        except httpx.HTTPError as e:
            r, answer = None, type(e).__name__
        with self.books.lock:
            self.books.statuses[f"admin {answer}"] += 1
            self.books.admin_log.append(
                f"{sent:.2f}-{time.monotonic() - self.books.began:.2f}s {request_id} port {port} "
                f"{method} {path} {body} -> {answer}")
        return r

    def busy_tenant(self) -> int:
        return self.rng.choice([t for t in range(len(self.books.tenants)) if t != QUIET_TENANT])

    def patch_org(self, tenant: int, body: dict[str, Any]) -> bool:
        org = self.books.tenants[tenant].org_id
        r = self.call("PATCH", f"/admin/v1/organisations/{org}", body)
        return r is not None and r.status_code == 200

    def create_key(self) -> None:
        tenant = self.rng.randrange(len(self.books.tenants))
        r = self.call("POST", f"/admin/v1/projects/{self.books.tenants[tenant].project_id}/api-keys",
                      {"name": f"chaos-{self.rng.randrange(10**6)}"})
        if r is not None and r.status_code == 201:
            with self.books.lock:
                self.books.live_keys.append(Key(r.json()["id"], r.json()["key"], tenant))

    def revoke_used_key(self, tenant: int) -> bool:
        with self.books.lock:
            used = [k for k in self.books.live_keys if k.used_on == set(self.ports)
                    and k.tenant == tenant]
            if not used:
                return False
            key = self.rng.choice(used)
            self.books.live_keys.remove(key)
            self.books.revoking.append(key)
        self.finish_revocations()
        # At once an update of another organisation: its position is after the revocation's,
        # and the two commit in different read models (issue 14, defect 1).
        self.rename(self.busy_tenant())
        return True

    def revoke_while_catalogue_lags(self) -> bool:
        """Hold the catalogue's tracking row (as `billing projections rebuild catalogue` does
        while it runs) for LAG_HOLD_S, and meanwhile revoke a key of QUIET_TENANT and update
        another organisation: the organisations read model commits the later position first,
        and every API process's key cache refreshes in between (issue 14, defect 1). False
        when it has not happened yet (no key of QUIET_TENANT used on every API process yet, or
        Postgres away): the admin tries again at its next turn."""
        with self.books.lock:
            if not any(k.tenant == QUIET_TENANT and k.used_on == set(self.ports)
                       for k in self.books.live_keys):
                return False
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT 1 FROM projection_tracking WHERE name = %s FOR UPDATE",
                             (CATALOGUE,))
                held = time.monotonic()
                revoked = self.revoke_used_key(QUIET_TENANT)
                self.stop.wait(max(0.0, held + LAG_HOLD_S - time.monotonic()))  # the lag's length
            outcome = f"revoked {revoked}"
        except psycopg.Error as e:  # Postgres restarting: the lag is tried again later
            outcome = type(e).__name__
        with self.books.lock:
            self.books.statuses[f"catalogue lag: {outcome}"] += 1
        return outcome == "revoked True"

    def finish_revocations(self) -> None:
        for key in list(self.books.revoking):
            r = self.call("DELETE", f"/admin/v1/api-keys/{key.id}")
            if r is not None and r.status_code in (204, 409):  # 409: an earlier try committed
                with self.books.lock:
                    self.books.revoking.remove(key)
                    self.books.revoked.append(key)

    def rename(self, tenant: int) -> None:
        self.renames += 1
        self.patch_org(tenant, {"name": f"chaos org {tenant} v{self.renames}"})

    def suspend_and_lift(self) -> None:
        tenant = self.busy_tenant()
        self.books.must_unsuspend.add(tenant)
        self.patch_org(tenant, {"suspended": True, "suspend_reason": "chaos"})
        self.lift_suspensions()

    def lift_suspensions(self) -> None:
        for tenant in sorted(self.books.must_unsuspend):
            if self.patch_org(tenant, {"suspended": False}):
                self.books.must_unsuspend.discard(tenant)

    def verify_lifted(self) -> None:
        """Read every organisation back (an admin read waits for its read model): one still
        suspended (a command whose answer was lost may have committed late) is lifted again."""
        for tenant, t in enumerate(self.books.tenants):
            r = self.call("GET", f"/admin/v1/organisations/{t.org_id}")
            if r is None or r.status_code != 200 or r.json()["suspended"]:
                self.books.must_unsuspend.add(tenant)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.lag.is_set() and self.revoke_while_catalogue_lags():
                    self.lag.clear()
                action = self.rng.choices(
                    ["key", "revoke", "rename", "ips", "rate", "suspend"], [4, 4, 1, 1, 1, 1])[0]
                tenant = self.busy_tenant()
                if action == "key":
                    self.create_key()
                elif action == "revoke":
                    self.revoke_used_key(tenant)  # QUIET_TENANT's keys: only while the lag
                elif action == "rename":
                    self.rename(tenant)
                elif action == "ips":
                    self.patch_org(tenant, {"allowed_ips": self.rng.choice(ALLOW_LISTS)})
                elif action == "rate":
                    self.patch_org(tenant, {"rate_limit": self.rng.choice(RATE_LIMITS)})
                else:
                    self.suspend_and_lift()
                self.finish_revocations()
                self.lift_suspensions()
                self.stop.wait(self.rng.uniform(0, 2 * ADMIN_PACE_S))
            deadline = time.monotonic() + DRAIN_DEADLINE_S
            self.books.must_unsuspend |= set(range(len(self.books.tenants)))  # verified below
            while (self.books.revoking or self.books.must_unsuspend) and time.monotonic() < deadline:
                self.finish_revocations()
                self.lift_suspensions()
                self.verify_lifted()
                time.sleep(RETRY_PACE_S)  # pacing retries, not waiting for a condition
            if self.books.revoking or self.books.must_unsuspend:
                self.books.violations.append(
                    f"admin: revocations {[k.id for k in self.books.revoking]} or lifting "
                    f"suspensions {self.books.must_unsuspend} never answered in {DRAIN_DEADLINE_S}s")
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.http.close()


class Invoicer(threading.Thread):
    """POST /admin/v1/invoice-runs for last month (ended; grace 0 h) until one answers 200."""

    def __init__(self, seed: int, books: Books, ports: list[int], stop: threading.Event,
                 period: str) -> None:
        super().__init__(name="invoicer", daemon=True)
        self.rng, self.books, self.ports, self.stop, self.period = (
            random.Random(seed), books, ports, stop, period)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.stop.wait(self.rng.uniform(1, INVOICE_RUN_PACE_S))
            while not self.stop.is_set() and not self.books.invoice_run_ok:
                port = self.rng.choice(self.ports)
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/admin/v1/invoice-runs", headers=ADMIN,
                                   json={"period": self.period}, timeout=INVOICE_RUN_HTTP_TIMEOUT_S)
                    self.books.invoice_runs.append(f"{r.status_code} {r.text[:300]}")
                    self.books.invoice_run_ok = r.status_code == 200
                except httpx.HTTPError as e:
                    self.books.invoice_runs.append(type(e).__name__)
                self.stop.wait(INVOICE_RUN_PACE_S)
        except BaseException as e:  # reported by the test
            self.error = e


# ---------------------------------------------------------------- setup and checks


def admin_post(port: int, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    r = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, headers=ADMIN, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == status, r.text
    out: dict[str, Any] = r.json()
    return out


def set_up_tenants(port: int) -> list[Tenant]:
    for meter in ({"code": CALLS, "name": "Calls", "aggregation": "count"},
                  {"code": GB, "name": "GB", "aggregation": "sum"}):
        r = httpx.post(f"http://127.0.0.1:{port}/admin/v1/meters", json=meter, headers=ADMIN,
                       timeout=HTTP_TIMEOUT_S)
        assert r.status_code in (200, 201), r.text
    admin_post(port, "/admin/v1/plans", {
        "code": "chaos", "name": "Chaos", "base_fee": "100", "minimum": "0", "charges": [
            {"metric": CALLS, "model": "per_unit", "unit_price": "0.01"},
            {"metric": GB, "model": "per_unit", "unit_price": "1.5"}]})
    tenants = []
    for i in range(ORGANISATIONS):
        org = admin_post(port, "/admin/v1/organisations",
                         {"name": f"chaos org {i}", "billing_email": f"ap@chaos{i}.in",
                          "state_code": "29"})["id"]
        project = admin_post(port, f"/admin/v1/organisations/{org}/projects", {"name": "p"})["id"]
        key = admin_post(port, f"/admin/v1/projects/{project}/api-keys", {"name": "stable"})["key"]
        r = httpx.put(f"http://127.0.0.1:{port}/admin/v1/organisations/{org}/subscription",
                      headers=ADMIN, timeout=HTTP_TIMEOUT_S,
                      json={"plan_code": "chaos",
                            "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()})
        assert r.status_code == 201, r.text
        r = httpx.patch(f"http://127.0.0.1:{port}/admin/v1/organisations/{org}", headers=ADMIN,
                        timeout=HTTP_TIMEOUT_S, json={"rate_limit": RATE_LIMITS[0]})
        assert r.status_code == 200, r.text  # 429s would only slow the workload down
        tenants.append(Tenant(org, project, key))
    return tenants


def ingest_status(port: int, key: str, eid: str) -> int:
    """The status of sending one CALLS event with `key` (0 when nothing answered)."""
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/api/v1/events", timeout=HTTP_TIMEOUT_S,
                       json={"events": [{"event_id": eid, "metric": CALLS}]},
                       headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError:
        return 0
    return r.status_code


def accepted(port: int, key: str, eid: str) -> bool:
    return ingest_status(port, key, eid) == 202


def caught_up(rt: Runtime) -> tuple[int, dict[str, int]]:
    """The ledger head and the read models whose tracking is still below it."""
    head = rt.ledger.head()
    with rt.pool.connection() as conn:
        tracking = all_tracking(conn)
    return head, {m.name: tracking.get(m.name, 0) for m in READ_MODELS
                  if tracking.get(m.name, 0) < head}


def secret_id(rt: Runtime, secret: str) -> str:
    """The id of the key whose visible prefix `secret` carries (bk_<prefix>_<secret>)."""
    with rt.pool.connection() as conn:
        row = conn.execute("SELECT id::text FROM api_keys WHERE prefix = %s",
                           (secret.split("_")[1],)).fetchone()
    return str(row[0]) if row else "?"


def state_of(rt: Runtime, key_id: str) -> str:
    """What the read models say of a key and its organisation, for a failure message: with
    them equal to the ledger, a refusal they do not explain is a stale API-process cache."""
    with rt.pool.connection() as conn:
        row = conn.execute(
            "SELECT k.revoked_at IS NOT NULL, k.ledger_position, o.suspended, o.allowed_ips,"
            " o.ledger_position FROM api_keys k JOIN organisations o ON o.id = k.organisation_id"
            " WHERE k.id::text = %s", (key_id,)).fetchone()
        tracking = all_tracking(conn)
    if row is None:
        return f"key {key_id} is not in api_keys"
    return (f"read models: key revoked={row[0]} at position {row[1]}, organisation suspended="
            f"{row[2]} allowed_ips={row[3]!r} at position {row[4]}; tracking {tracking}")


def audit_of(rt: Runtime, org_id: str) -> list[str]:
    """An organisation's audit trail (the ledger's record of admin commands), oldest first."""
    with rt.pool.connection() as conn:
        return [" ".join(map(str, row)) for row in conn.execute(
            "SELECT ledger_position, at, request_id, action, changes FROM audit_events"
            " WHERE organisation_id::text = %s ORDER BY ledger_position", (org_id,))]


def snapshot(rt: Runtime, model: ReadModel) -> dict[str, list[str]]:
    """Every row of the model's tables as text, in a total order."""
    with rt.pool.connection() as conn:
        return {table: [str(row[0]) for row in conn.execute(
            sql.SQL("SELECT t::text FROM {} AS t ORDER BY 1").format(sql.Identifier(table)))]
            for table in model.tables}


def differences(live: dict[str, list[str]], rebuilt: dict[str, list[str]]) -> list[str]:
    out = []
    for table in live:
        only_live = sorted(set(live[table]) - set(rebuilt[table]))
        only_rebuilt = sorted(set(rebuilt[table]) - set(live[table]))
        if only_live or only_rebuilt or len(live[table]) != len(rebuilt[table]):
            out.append(f"{table}: {len(live[table])} rows live, {len(rebuilt[table])} rebuilt;\n"
                       f"  only live: {only_live[:5]}\n  only rebuilt: {only_rebuilt[:5]}")
    return out


def key_problems(books: Books, runtime: Runtime, ports: list[int], caught_at: float) -> list[str]:
    """Every revoked key is refused by every API process within REVOCATION_DEADLINE_S of
    `caught_at`, and every valid key is accepted by each (events accepted here join the books)."""
    problems: list[str] = []
    tenants = books.tenants
    # Every revoked key is refused by every API process within 5 s; a valid key is accepted.
    checks = 0

    def refused(key: Key, port: int) -> bool:
        nonlocal checks
        checks += 1
        eid = f"after-revoke-{key.id}-{port}-{checks}"
        status = ingest_status(port, key.key, eid)
        if status == 202:  # committed: the fold must include it
            books.acked[(key.tenant, eid)] = (CALLS, Decimal(1))
        return status == 401

    for key in books.revoked:
        for port in ports:
            remaining = REVOCATION_DEADLINE_S - (time.monotonic() - caught_at)
            try:
                wait_sync(partial(refused, key, port), "401", max(remaining, 0.0))
            except AssertionError:
                problems.append(f"revoked key {key.id} (tenant {key.tenant}) still accepted by "
                                f"the API on port {port} {REVOCATION_DEADLINE_S}s after the "
                                f"read models caught up; {state_of(runtime, key.id)}")
    with books.lock:
        valid = [(k.tenant, k.key, k.id) for k in books.live_keys]
    valid += [(t, tenant.stable_key, "stable") for t, tenant in enumerate(tenants)]
    for t, secret, name in valid:
        for port in ports:
            eid = f"valid-{name}-{port}"
            answers: list[int] = []  # a 503 asks for a resend (the same event: no double)

            def answered_202(port: int = port, secret: str = secret, eid: str = eid,
                             answers: list[int] = answers) -> bool:
                answers.append(ingest_status(port, secret, eid))
                return answers[-1] == 202

            try:
                wait_sync(answered_202, "202", VALID_KEY_DEADLINE_S)
                books.acked[(t, eid)] = (CALLS, Decimal(1))
                if len(answers) > 1:
                    print(f"valid key {name} on port {port}: {answers} before the 202")
            except AssertionError:  # (a 503 may have committed it: the fold may differ too)
                status = Counter(answers).most_common(1)[0][0]
                org = tenants[t].org_id
                problems.append(f"valid key {name} of tenant {t} got {status} on port {port}; "
                                f"{state_of(runtime, secret_id(runtime, secret))}\n  audit: "
                                + "\n    ".join(audit_of(runtime, org)) + "\n  admin calls: "
                                + "\n    ".join(c for c in books.admin_log if org in c))
    return problems


def usage_problems(books: Books, runtime: Runtime) -> list[str]:
    """The usage totals are the fold of every acked event, each counted once."""
    problems: list[str] = []
    tenants = books.tenants
    # Usage totals are the fold of every acked event, each once.
    expected: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for (t, _), (metric, value) in books.acked.items():
        expected[(tenants[t].project_id, metric, "count")] += 1
        if metric == GB:
            expected[(tenants[t].project_id, metric, "sum")] += value
    with runtime.pool.connection() as conn:
        rows = conn.execute(
            "SELECT project_id::text, metric, granularity, sum(count), sum(sum) FROM usage_totals"
            " GROUP BY 1, 2, 3").fetchall()
    for granularity in ("day", "month"):
        found: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
        for project, metric, g, count, total in rows:
            if g == granularity:
                found[(project, metric, "count")] += int(count)
                if metric == GB:
                    found[(project, metric, "sum")] += Decimal(total)
        if found != expected:
            problems.append(f"usage totals by {granularity} differ from the fold of acked events: "
                            f"found {dict(found)}, expected {dict(expected)}")
    return problems


def rebuild_problems(runtime: Runtime) -> list[str]:
    """Every read model equals a rebuild of it from position 0 (nothing may write meanwhile)."""
    problems: list[str] = []
    # Every read model equals a rebuild of it from position 0.
    for model in READ_MODELS:
        live = snapshot(runtime, model)
        rebuild(runtime.pool, runtime.ledger, model)
        problems += [f"read model {model.name} differs from its rebuild: {d}"
                     for d in differences(live, snapshot(runtime, model))]
    return problems


# ---- the service's processes -----------------------------------------------------------------

class ServiceProcesses:
    """`python -m infra.cli <role>` processes of one test, against its own Postgres and NATS;
    each one's output goes to a numbered log under `tmp`, shown when the test fails."""

    def __init__(self, tmp: Path, database_url: str, nats_url: str) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BILLING_", "DATABASE_URL", "NATS_URL", "PG"))}
        self.env |= {"DATABASE_URL": database_url, "NATS_URL": nats_url,
                     "BILLING_DATA_DIR": str(tmp / "data"), "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
                     "BILLING_GRACE_HOURS": "0", "LOG_LEVEL": "WARNING"}
        self.ports = [free_port(), free_port()]
        self.everything: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, role: str, port: int | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{len(self.everything) + 1:02d}-{name}.log").open("wb")
        extra = (env or {}) | ({"PORT": str(port)} if port else {})
        proc = subprocess.Popen([sys.executable, "-m", "infra.cli", role], env=self.env | extra,
                                cwd=REPO_ROOT, stdout=log, stderr=log)
        log.close()
        self.everything.append(proc)
        return proc

    def wait_api(self, port: int) -> None:
        wait_sync(partial(http_status_is, f"http://127.0.0.1:{port}/health/ready", 200),
                  f"the API on port {port} ready", READY_DEADLINE_S)

    def stop_all(self) -> None:
        """SIGTERM every process this test started (SIGKILL after the timeout)."""
        for proc in self.everything:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.everything:
            try:
                proc.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(PROCESS_STOP_TIMEOUT_S)

    def logs_tail(self, chars: int = 1500) -> str:
        out = []
        for path in sorted(self.tmp.glob("*.log")):
            text = path.read_text(errors="replace").strip()
            if text:
                out.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(out)
