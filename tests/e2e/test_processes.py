"""Several processes, one truth (issue 19): two `billing api`, two `billing worker` (relay and
projectors each) and one `billing relay` against one external Postgres and one external NATS,
all on loopback, under the mixed workload of tests/e2e/workload.py. During the load the active
relay is SIGKILLed (a standby takes over), then one API process and one worker.

Afterwards: every acked event is counted once in the usage totals (nothing lost, nothing
doubled), every read model equals its rebuild, every revoked key is refused by both API
processes, one organisation's rate limit holds across both API processes together, and the
ledger kept moving to the read models after each kill.

Each process connects with its own PGAPPNAME, so the relay that holds the advisory lock is
named by Postgres itself."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path

import httpx
import pytest

from adapters.bookkeeping import dead_letters, lock_key
from adapters.relay import RELAY_NAME
from infra.embedded import EmbeddedPostgres, embedded_servers
from infra.settings import from_env
from infra.wiring import Runtime
from tests.conftest import wait_sync
from tests.e2e.workload import (
    ADMIN,
    ADMIN_TOKEN,
    CALLS,
    CATCH_UP_DEADLINE_S,
    DRAIN_DEADLINE_S,
    HTTP_TIMEOUT_S,
    PROCESS_STOP_TIMEOUT_S,
    QUIET_TENANT,
    READY_DEADLINE_S,
    Admin,
    Books,
    Sender,
    ServiceProcesses,
    accepted,
    caught_up,
    ingest_status,
    key_problems,
    last_period,
    rebuild_problems,
    set_up_tenants,
    usage_problems,
)

pytestmark = pytest.mark.slow

SEED = 19
WORKLOAD_S = 16.0
SENDERS = 3
KILL_RELAY_AT_S, KILL_API_AT_S, KILL_WORKER_AT_S = 3.0, 7.0, 11.0
RESTART_AFTER_S = 0.5
TAKEOVER_DEADLINE_S = 20.0
# The rate-limit check: a bucket both API processes must share.
LIMIT_PER_S, LIMIT_BURST = 2, 4
LIMIT_WINDOW_S = 3.0
LIMIT_REQUESTS_MAX = 400  # a bound on the loop; the window ends it first


class Processes(ServiceProcesses):
    """The service's processes by name, each connecting to Postgres as PGAPPNAME=<name>."""

    def __init__(self, tmp: Path, database_url: str, nats_url: str) -> None:
        super().__init__(tmp, database_url, nats_url)
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()

    def start(self, name: str, role: str, port: int | None = None) -> None:
        self.live[name] = self.spawn(name, role, port, env={"PGAPPNAME": name})

    def kill(self, name: str) -> None:
        proc = self.live.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(PROCESS_STOP_TIMEOUT_S)
        self.killed.add(name)

    def died(self) -> list[str]:
        return [f"{name}: exit {p.returncode}" for name, p in self.live.items() if p.poll() is not None]


def relay_leader(rt: Runtime) -> str | None:
    """The PGAPPNAME of the process whose relay holds the relay's advisory lock."""
    key = lock_key(rt.settings.pg_schema, RELAY_NAME)
    with rt.pool.connection() as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0"
            " AND l.objid::text::bigint = %s AND l.objsubid = 1", (key,)).fetchone()
    return str(row[0]) if row else None


def relayed_beyond(rt: Runtime, position: int) -> bool:
    """Some read model tracked past `position`: the relay delivered what came after it."""
    with rt.pool.connection() as conn:
        row = conn.execute("SELECT max(position) FROM projection_tracking").fetchone()
    return bool(row and row[0] is not None and row[0] > position)


def refused(send: Callable[[int], int], port: int) -> bool:
    return send(port) == 429


def shared_rate_limit_problems(books: Books, ports: list[int]) -> list[str]:
    """Set a small rate limit on QUIET_TENANT's organisation; once both API processes enforce
    it, send to both alternately for LIMIT_WINDOW_S: together they accept no more than one
    bucket allows (a limit per process would accept about twice as much)."""
    tenant = books.tenants[QUIET_TENANT]
    r = httpx.patch(f"http://127.0.0.1:{ports[0]}/admin/v1/organisations/{tenant.org_id}",
                    headers=ADMIN, timeout=HTTP_TIMEOUT_S,
                    json={"rate_limit": {"per_second": LIMIT_PER_S, "burst": LIMIT_BURST}})
    assert r.status_code == 200, r.text
    sent = 0

    def send(port: int) -> int:
        nonlocal sent
        sent += 1
        eid = f"limit-{port}-{sent}"
        status = ingest_status(port, tenant.stable_key, eid)
        if status == 202:
            books.acked[(QUIET_TENANT, eid)] = (CALLS, Decimal(1))
        return status

    for port in ports:  # each process has seen the new limit: it refuses once the bucket is dry
        wait_sync(partial(refused, send, port), f"429 from port {port}", DRAIN_DEADLINE_S)
    accepted_in_window = 0
    began = time.monotonic()
    for i in range(LIMIT_REQUESTS_MAX):
        if time.monotonic() - began > LIMIT_WINDOW_S:
            break
        if send(ports[i % 2]) == 202:
            accepted_in_window += 1
    elapsed = time.monotonic() - began
    allowed = LIMIT_PER_S * elapsed + 1  # refill over the window (the bucket started empty)
    if accepted_in_window > allowed:
        return [f"both API processes accepted {accepted_in_window} in {elapsed:.1f}s under a shared "
                f"limit of {LIMIT_PER_S}/s: the limit is not shared"]
    if accepted_in_window == 0:
        return ["nothing was accepted under the rate limit: the check proved nothing"]
    return []


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    with embedded_servers(tmp_path / "servers", need_pg=True, need_nats=True, fsync=False) as (pg, nats):
        assert pg is not None and nats is not None
        yield pg, nats.url


def test_two_apis_two_workers_and_a_relay_with_standbys_lose_and_double_nothing_when_one_of_each_dies(
    tmp_path: Path, servers: tuple[EmbeddedPostgres, str]
) -> None:
    rng = random.Random(SEED)
    pg, nats_url = servers
    procs = Processes(tmp_path, pg.url, nats_url)
    rt: Runtime | None = None
    problems: list[str] = []
    try:
        settings = from_env({"BILLING_DATA_DIR": str(tmp_path / "data"), "BILLING_ADMIN_TOKEN": ADMIN_TOKEN})
        for i, port in enumerate(procs.ports, start=1):
            procs.start(f"api-{i}", "api", port)
        procs.start("relay-1", "relay")
        for port in procs.ports:
            procs.wait_api(port)
        rt = runtime = Runtime.open(settings, pg.url, nats_url)
        wait_sync(lambda: relay_leader(runtime) == "relay-1", "relay-1 leading", READY_DEADLINE_S)
        procs.start("worker-1", "worker")
        procs.start("worker-2", "worker")
        ports = procs.ports
        tenants = set_up_tenants(ports[0])
        for tenant in tenants:
            for port in ports:
                wait_sync(partial(accepted, port, tenant.stable_key, f"warm-{port}"),
                          "a stable key accepted", READY_DEADLINE_S)
        books = Books(tenants)
        for t in range(len(tenants)):
            for port in ports:
                books.acked[(t, f"warm-{port}")] = (CALLS, Decimal(1))
        _, late = last_period()
        stop = threading.Event()
        workers: list[Sender | Admin] = [
            Sender(i, rng.randrange(2**32), books, ports, stop, late) for i in range(SENDERS)]
        workers.append(Admin(rng.randrange(2**32), books, ports, stop, runtime.pool))
        began = books.began = time.monotonic()
        for worker in workers:
            worker.start()

        def at(seconds: float) -> None:
            stop.wait(max(0.0, began + seconds - time.monotonic()))  # a timetable, not a sync

        at(KILL_RELAY_AT_S)
        procs.kill("relay-1")
        head = runtime.ledger.head()
        heir = wait_sync(lambda: relay_leader(runtime), "a standby relay leading", TAKEOVER_DEADLINE_S)
        wait_sync(partial(relayed_beyond, runtime, head), "entries relayed after the takeover",
                  TAKEOVER_DEADLINE_S)
        print(f"relay-1 killed at {time.monotonic() - began:.1f}s; {heir} took over")
        at(KILL_API_AT_S)
        procs.kill("api-2")
        stop.wait(RESTART_AFTER_S)
        procs.start("api-2b", "api", ports[1])
        procs.wait_api(ports[1])  # a fresh process answers nothing until ready: not a refusal
        at(KILL_WORKER_AT_S)
        victim = heir if heir in procs.live else "worker-1"  # the active relay, if a worker's
        procs.kill(victim)
        stop.wait(RESTART_AFTER_S)
        procs.start(f"{victim}b", "worker")
        at(WORKLOAD_S)
        stop.set()
        for worker in workers:
            worker.join(DRAIN_DEADLINE_S * 2)
            assert not worker.is_alive(), f"{worker.name} did not finish"
            assert worker.error is None, f"{worker.name} failed: {worker.error!r}"
        final_relay = relay_leader(runtime)
        print(f"workload done; statuses {dict(books.statuses)}; {len(books.acked)} events acked; "
              f"{len(books.revoked)} keys revoked; relay now led by {final_relay}")
        problems += books.violations
        problems += [f"a process died: {d}" for d in procs.died()]
        if final_relay in procs.killed or final_relay is None:
            problems.append(f"no live relay leads after the kills: {final_relay}")
        if not books.revoked:
            problems.append("no key was revoked during the workload: the test tried nothing there")

        wait_sync(lambda: not caught_up(runtime)[1], "every read model at the ledger head",
                  CATCH_UP_DEADLINE_S)
        problems += key_problems(books, runtime, ports, time.monotonic())
        problems += shared_rate_limit_problems(books, ports)
        wait_sync(lambda: not caught_up(runtime)[1], "every read model at the ledger head again",
                  CATCH_UP_DEADLINE_S)
        procs.stop_all()  # nothing writes from here on
        with runtime.pool.connection() as conn:
            problems += [f"dead letter: {letter}" for letter in dead_letters(conn)]
        problems += usage_problems(books, runtime)
        problems += rebuild_problems(runtime)
        assert not problems, "\n".join(problems) + "\n" + procs.logs_tail()
    finally:
        procs.stop_all()
        if rt is not None:
            rt.pool.close()
            rt.ledger.close()
