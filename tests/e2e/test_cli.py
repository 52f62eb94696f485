"""`billing serve` on the embedded default: ready, serving, stopping cleanly, data kept; and the
operator commands around it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from infra.embedded import free_port
from tests.conftest import http_status, wait_sync

READY_DEADLINE_S = 60.0
BILLING = [sys.executable, "-m", "infra.cli"]


def _env(data: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    env |= {"BILLING_DATA_DIR": str(data), "PORT": str(port), "BILLING_ADMIN_TOKEN": "cli-token"}
    return env


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        assert proc.poll() is None, "billing serve exited early"
        return http_status(url) == 200

    wait_sync(ready, "billing serve ready", READY_DEADLINE_S)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    yield tmp_path / "data", free_port()
    # Whatever happened, nothing started under this folder keeps running.
    subprocess.run(["pkill", "-f", str(tmp_path)], check=False)


def _start(data: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*BILLING, "serve"], env=_env(data, port) | env, cwd=Path.cwd(),
                            stdout=subprocess.DEVNULL, stderr=(data.parent / "serve.log").open("ab"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_serve_starts_embedded_servers_serves_and_keeps_data(serve: tuple[Path, int]) -> None:
    data, port = serve
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer cli-token"}
    proc = _start(data, port)
    try:
        _wait_ready(f"{base}/health/ready", proc)
        r = httpx.post(f"{base}/admin/v1/organisations", headers=auth,
                       json={"name": "Kept", "billing_email": "a@b.in"}, timeout=10)
        assert r.status_code == 201
    finally:
        _stop(proc)
    pg_pid = data / "pg" / "postmaster.pid"
    assert not pg_pid.exists(), "embedded Postgres was left running"

    proc = _start(data, port)
    try:
        _wait_ready(f"{base}/health/ready", proc)
        names = [o["name"] for o in httpx.get(f"{base}/admin/v1/organisations", headers=auth,
                                              timeout=10).json()["items"]]
        assert names == ["Kept"]
    finally:
        _stop(proc)

    env = _env(data, port)
    status = subprocess.run([*BILLING, "projections", "status"], env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    assert "organisations: position" in status.stdout and "lag 0" in status.stdout
    rebuilt = subprocess.run([*BILLING, "projections", "rebuild", "organisations"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
    reached = re.search(r"organisations rebuilt up to ledger position (\d+)", rebuilt.stdout)
    head = re.search(r"head (\d+)", status.stdout)
    assert reached and head and reached.group(1) == head.group(1)
    assert "rebuild organisations" in rebuilt.stderr  # the progress bar
    dlq = subprocess.run([*BILLING, "dlq", "list"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert dlq.stdout == "no dead letters\n"
    assert not pg_pid.exists()


def test_serve_runs_several_api_processes_on_one_port_and_stops_them_all(
    serve: tuple[Path, int],
) -> None:
    data, port = serve
    base = f"http://127.0.0.1:{port}"
    proc = _start(data, port, BILLING_API_PROCESSES="3")
    try:
        _wait_ready(f"{base}/health/ready", proc)
        children = [c for c in psutil.Process(proc.pid).children() if "infra.cli" in c.cmdline()]
        apis = {proc.pid} | {c.pid for c in children if "--listen-fd" in c.cmdline()}
        # Two more API processes and the worker (the relay and the projectors).
        assert len(apis) == 3 and len(children) == 3

        def answered_by_all(seen: set[int] = set()) -> bool:  # noqa: B006 (kept across calls)
            with httpx.Client(timeout=5) as client:  # a new connection each time
                seen.add(client.get(f"{base}/health/live").json()["process"])
            return seen == apis

        wait_sync(answered_by_all, "every API process answering on the shared port")
        # A second service on the same port refuses to start instead of sharing it.
        other = subprocess.run([*BILLING, "api"], env=_env(data.parent / "other", port),
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0
    finally:
        _stop(proc)
    assert not any(psutil.pid_exists(c.pid) and c.status() != psutil.STATUS_ZOMBIE
                   for c in children)


def test_serve_stops_when_one_of_its_api_processes_dies(serve: tuple[Path, int]) -> None:
    data, port = serve
    proc = _start(data, port, BILLING_API_PROCESSES="2")
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health/ready", proc)
        (api,) = [c for c in psutil.Process(proc.pid).children() if "--listen-fd" in c.cmdline()]
        api.kill()
        assert proc.wait(60) != 0  # not half a service: all of it stops, and says so
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert "a child process" in (data.parent / "serve.log").read_text()
