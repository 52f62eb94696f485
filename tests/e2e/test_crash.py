"""SIGKILL the service in the middle of a bounded load, restart it, resend every request that got
no 202: the totals equal the fold over every event that ever got a 202 — none lost, none doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from infra.embedded import EmbeddedPostgres, free_port
from tests.conftest import http_status, wait_sync

REQUESTS = 120
EVENTS_PER_REQUEST = 50
KILL_AFTER_RESPONSES = 30
WORKERS = 6
ADMIN = {"Authorization": "Bearer crash-token"}


def _start(data: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    env |= {"BILLING_DATA_DIR": str(data), "PORT": str(port), "BILLING_ADMIN_TOKEN": "crash-token",
            "LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def place(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data = tmp_path / "data"
    yield data, free_port()
    # The restarted service reused the servers the killed one started: stop them here.
    EmbeddedPostgres(data / "pg", owned=True).stop()
    pid_file = data / "nats" / "nats.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    subprocess.run(["pkill", "-f", str(tmp_path)], check=False)


def _body(n: int) -> dict[str, object]:
    return {"events": [
        {"event_id": f"r{n}-e{i}", "metric": "gb", "value": str(Decimal(n % 7) + Decimal("0.25"))}
        for i in range(EVENTS_PER_REQUEST)
    ]}


def test_sigkill_mid_load_loses_nothing_and_doubles_nothing(place: tuple[Path, int]) -> None:
    data, port = place
    base = f"http://127.0.0.1:{port}"
    proc = _start(data, port)
    try:
        wait_sync(lambda: http_status(f"{base}/health/ready") == 200, "ready", 60)
        with httpx.Client(base_url=base, headers=ADMIN, timeout=10) as admin:
            org = admin.post("/admin/v1/organisations",
                             json={"name": "crash", "billing_email": "a@b.in"}).json()["id"]
            project = admin.post(f"/admin/v1/organisations/{org}/projects",
                                 json={"name": "p"}).json()["id"]
            key = admin.post(f"/admin/v1/projects/{project}/api-keys", json={"name": "k"}).json()["key"]
            assert admin.post("/admin/v1/meters", json={"code": "gb", "name": "GB",
                                                        "aggregation": "sum"}).status_code == 201
        auth = {"Authorization": f"Bearer {key}"}
        acked: set[int] = set()
        lock = threading.Lock()

        def send(n: int) -> None:
            try:
                r = httpx.post(f"{base}/api/v1/events", json=_body(n), headers=auth, timeout=10)
            except httpx.HTTPError:
                return
            if r.status_code == 202:
                with lock:
                    acked.add(n)
                    if len(acked) == KILL_AFTER_RESPONSES:
                        proc.send_signal(signal.SIGKILL)

        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(send, range(REQUESTS)))
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        assert KILL_AFTER_RESPONSES <= len(acked) < REQUESTS  # killed mid-load

        proc = _start(data, port)
        wait_sync(lambda: http_status(f"{base}/health/ready") == 200, "ready again", 60)
        missing = [n for n in range(REQUESTS) if n not in acked]
        duplicates = 0
        for n in missing + sorted(acked)[:5]:
            r = httpx.post(f"{base}/api/v1/events", json=_body(n), headers=auth, timeout=10)
            assert r.status_code == 202, r.text
            duplicates += r.json()["duplicates"]
            position = r.headers["x-ledger-position"]
        assert duplicates >= 5 * EVENTS_PER_REQUEST  # the acked ones are all duplicates
        expected = sum(Decimal(n % 7) + Decimal("0.25") for n in range(REQUESTS)) * EVENTS_PER_REQUEST
        r = httpx.get(f"{base}/api/v1/usage", params={"metric": "gb"}, timeout=10,
                      headers=auth | {"X-Ledger-Position": position})
        assert Decimal(r.json()["items"][0]["quantity"]) == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
