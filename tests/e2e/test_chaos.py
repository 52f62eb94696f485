"""Chaos: a bounded mixed workload (ingestion with resends, key revocations, organisation updates,
an invoice run) against two `billing api` processes, a `billing relay` and a `billing project`,
while the projector process is SIGKILLed at random moments, Postgres is stopped and started
once, the catalogue projector is held up once (its tracking row locked, as a rebuild does) and an
operator rebuilds one read model online. Afterwards every read model equals a rebuild of it from
position 0, the usage totals equal the fold of every event that got a 202 (each counted once),
and every revoked key is refused by every API process.

The servers are this test's own (under tmp_path), so stopping Postgres disturbs no other test.
The seed is printed; `CHAOS_SEED=<n>` replays a run's choices (not the OS's interleaving).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path

import httpx
import psycopg
import pytest

from adapters.bookkeeping import dead_letters
from adapters.maintenance import rebuild
from infra import embedded
from infra.embedded import EmbeddedPostgres, embedded_servers
from infra.settings import from_env
from infra.wiring import READ_MODELS, Runtime
from tests.conftest import wait_sync
from tests.e2e.workload import (
    ADMIN,
    ADMIN_TOKEN,
    CALLS,
    CATCH_UP_DEADLINE_S,
    DEFAULT_SEED,
    DRAIN_DEADLINE_S,
    INVOICE_RUN_HTTP_TIMEOUT_S,
    LAG_HOLD_S,
    PROCESS_STOP_TIMEOUT_S,
    PROJECTOR_KILLS_MAX,
    PROJECTOR_KILLS_MIN,
    QUIET_TENANT,
    QUIET_TENANT_KEYS,
    READY_DEADLINE_S,
    RESTART_DELAY_MAX_S,
    SENDERS,
    USAGE_TOTALS,
    WORKLOAD_S,
    Admin,
    Books,
    Invoicer,
    Key,
    Sender,
    ServiceProcesses,
    accepted,
    admin_post,
    caught_up,
    key_problems,
    last_period,
    rebuild_problems,
    set_up_tenants,
    usage_problems,
)

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- the service's processes


class Service(ServiceProcesses):
    """Two `billing api`, a `billing relay` and a `billing project` (killed and restarted)."""

    def __init__(self, tmp: Path, database_url: str, nats_url: str) -> None:
        super().__init__(tmp, database_url, nats_url)
        self.apis: list[subprocess.Popen[bytes]] = []
        self.relay: subprocess.Popen[bytes] | None = None
        self.projector: subprocess.Popen[bytes] | None = None

    def _start(self, role: str, port: int | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(f"{role}-{port or ''}", role, port)

    def start_all(self) -> None:
        self.apis = [self._start("api", port) for port in self.ports]
        self.relay = self._start("relay")
        self.projector = self._start("project")
        for port in self.ports:
            self.wait_api(port)

    def kill_projector(self) -> None:
        assert self.projector is not None
        self.projector.send_signal(signal.SIGKILL)
        self.projector.wait(PROCESS_STOP_TIMEOUT_S)

    def start_projector(self) -> None:
        self.projector = self._start("project")

    def died(self) -> list[str]:
        """Processes that exited by themselves (not killed by the test), with their exit codes."""
        live = [*self.apis, self.relay, self.projector]
        return [f"{' '.join(map(str, p.args[3:]))}: exit {p.returncode}"  # type: ignore[index]
                for p in live if p is not None and p.poll() is not None]


def restart_postgres(pg: EmbeddedPostgres) -> float:
    """Stop Postgres (fast shutdown: every session is cut) and start it again on the same data
    folder and port, so that every process's DATABASE_URL still points at it. Returns the time
    it was away, in seconds."""
    port, began = pg.port, time.monotonic()
    pg.stop()
    with pytest.MonkeyPatch.context() as mp:  # start() picks a free port; the same one is needed
        mp.setattr(embedded, "free_port", lambda host="127.0.0.1": port)
        pg.start()
    assert pg.port == port
    return time.monotonic() - began



@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    with embedded_servers(tmp_path / "servers", need_pg=True, need_nats=True, fsync=False) as (pg, nats):
        assert pg is not None and nats is not None
        yield pg, nats.url


# ---------------------------------------------------------------- the test


def test_read_models_equal_a_rebuild_and_revoked_keys_are_refused_after_kills_and_a_postgres_restart(
    tmp_path: Path, servers: tuple[EmbeddedPostgres, str]
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", DEFAULT_SEED))
    print(f"chaos seed {seed} (replay with CHAOS_SEED={seed})")
    rng = random.Random(seed)
    pg, nats_url = servers
    service = Service(tmp_path, pg.url, nats_url)
    rt: Runtime | None = None
    problems: list[str] = []
    try:
        service.start_all()
        settings = from_env({"BILLING_DATA_DIR": str(tmp_path / "data"),
                             "BILLING_ADMIN_TOKEN": ADMIN_TOKEN})
        rt = runtime = Runtime.open(settings, pg.url, nats_url)
        ports = service.ports
        tenants = set_up_tenants(ports[0])
        for tenant in tenants:  # every stable key works on both processes before the chaos
            for port in ports:
                wait_sync(partial(accepted, port, tenant.stable_key, f"warm-{port}"),
                          "a stable key accepted", READY_DEADLINE_S)
        books = Books(tenants)
        for t in range(len(tenants)):
            for port in ports:
                books.acked[(t, f"warm-{port}")] = (CALLS, Decimal(1))
        for i in range(QUIET_TENANT_KEYS):
            made = admin_post(ports[0], f"/admin/v1/projects/{tenants[QUIET_TENANT].project_id}/api-keys",
                              {"name": f"quiet-{i}"})
            books.live_keys.append(Key(made["id"], made["key"], QUIET_TENANT))

        period, late = last_period()
        stop = threading.Event()
        workers: list[Sender | Admin | Invoicer] = [
            Sender(i, rng.randrange(2**32), books, ports, stop, late) for i in range(SENDERS)]
        admin = Admin(rng.randrange(2**32), books, ports, stop, runtime.pool)
        workers += [admin, Invoicer(rng.randrange(2**32), books, ports, stop, period)]
        kills = sorted(rng.uniform(2, WORKLOAD_S - 3)
                       for _ in range(rng.randint(PROJECTOR_KILLS_MIN, PROJECTOR_KILLS_MAX)))
        schedule = sorted([(t, "kill") for t in kills]
                          + [(rng.uniform(2, WORKLOAD_S * 0.3 - LAG_HOLD_S), "lag"),
                             (rng.uniform(WORKLOAD_S * 0.3, WORKLOAD_S * 0.6), "postgres"),
                             (rng.uniform(WORKLOAD_S * 0.6, WORKLOAD_S - 3), "rebuild")])
        # Rebuilt by an operator while the load goes on: the model the load writes all the time,
        # so the ledger's head moves while the rebuild waits for the tracking lock (defect 2).
        online = next(m for m in READ_MODELS if m.name == USAGE_TOTALS)
        print(f"schedule (s after start): {[(round(t, 1), what) for t, what in schedule]}; "
              f"online rebuild of {online.name}")

        began = books.began = time.monotonic()
        for worker in workers:
            worker.start()
        for at, what in schedule:
            stop.wait(max(0.0, began + at - time.monotonic()))  # a timetable, not a synchronisation
            if what == "kill":
                service.kill_projector()
                stop.wait(rng.uniform(0, RESTART_DELAY_MAX_S))
                service.start_projector()
            elif what == "lag":
                admin.lag.set()
            elif what == "rebuild":
                try:
                    rebuild(runtime.pool, runtime.ledger, online)
                    print(f"{online.name} rebuilt online at {time.monotonic() - began:.1f}s")
                except psycopg.Error as e:
                    problems.append(f"the online rebuild of {online.name} failed: {e!r}")
            else:
                away = restart_postgres(pg)
                # This test's own pools: drop the connections the stop cut, at once (the ledger's
                # would otherwise stall its next use ~10 s, see ADMIN_HTTP_TIMEOUT_S).
                runtime.pool.check()
                runtime.ledger.recorder.datastore.pool.check()
                print(f"postgres restarted at {time.monotonic() - began:.1f}s, away {away:.1f}s")
        stop.wait(max(0.0, began + WORKLOAD_S - time.monotonic()))
        stop.set()
        for worker in workers:
            worker.join(DRAIN_DEADLINE_S + INVOICE_RUN_HTTP_TIMEOUT_S)
            assert not worker.is_alive(), f"{worker.name} did not finish"
            assert worker.error is None, f"{worker.name} failed: {worker.error!r}"
        print(f"workload done at {time.monotonic() - began:.1f}s; statuses {dict(books.statuses)}; "
              f"{len(books.acked)} distinct events acked; {len(books.revoked)} keys revoked; "
              f"invoice runs {books.invoice_runs}; senders stopped at "
              f"{[round(w.finished_at, 1) for w in workers if isinstance(w, Sender)]}s")
        print("admin calls:\n  " + "\n  ".join(books.admin_log))
        problems += books.violations
        if not books.statuses["catalogue lag: revoked True"]:
            problems.append("the catalogue lag did not revoke a key: the test tried nothing there")
        problems += [f"a process died: {d}" for d in service.died()]

        # Every read model reaches the ledger head.
        wait_sync(lambda: not caught_up(runtime)[1], "every read model at the ledger head",
                  CATCH_UP_DEADLINE_S)
        caught_at = time.monotonic()

        problems += key_problems(books, runtime, ports, caught_at)
        if not books.invoice_run_ok:
            problems.append(f"no invoice run answered 200 during the workload: {books.invoice_runs}")
            r = httpx.post(f"http://127.0.0.1:{ports[0]}/admin/v1/invoice-runs", headers=ADMIN,
                           json={"period": period}, timeout=INVOICE_RUN_HTTP_TIMEOUT_S)
            assert r.status_code == 200, r.text

        wait_sync(lambda: not caught_up(runtime)[1], "every read model at the ledger head again",
                  CATCH_UP_DEADLINE_S)
        service.stop_all()  # nothing writes from here on: the comparison sees one ledger
        head, behind = caught_up(runtime)
        assert not behind, f"read models behind the head {head} after the stop: {behind}"
        with runtime.pool.connection() as conn:
            letters = dead_letters(conn)
        problems += [f"dead letter: {letter}" for letter in letters]

        problems += usage_problems(books, runtime)

        # One invoice per organisation for the period.
        with runtime.pool.connection() as conn:
            invoiced = conn.execute("SELECT organisation_id::text, count(*) FROM invoices"
                                    " WHERE period = %s GROUP BY 1", (period,)).fetchall()
        if sorted(invoiced) != sorted((t.org_id, 1) for t in tenants):
            problems.append(f"invoices for {period}: {invoiced}, expected one per organisation")

        problems += rebuild_problems(runtime)

        assert not problems, "\n".join(problems) + "\n" + service.logs_tail()
    finally:
        service.stop_all()
        if rt is not None:
            rt.pool.close()
            rt.ledger.close()
