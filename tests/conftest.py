"""Test fixtures: one embedded Postgres and one NATS per session (or DATABASE_URL / NATS_URL
when given), and for every test its own Postgres schema and JetStream stream names."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from psycopg import sql

from adapters.usage_writer import UsageWriter
from domain.records import Appended
from infra.embedded import embedded_servers
from infra.roles import run_roles
from infra.settings import Settings, from_env
from infra.wiring import ApiRole, Runtime

WAIT_DEADLINE_S = 20.0
POLL_S = 0.02
TEST_ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    env = from_env()
    data = tmp_path_factory.mktemp("servers")
    with embedded_servers(
        data, need_pg=env.database_url is None, need_nats=env.nats_url is None, fsync=False
    ) as (pg, nats_server):
        yield (env.database_url or (pg.url if pg else ""),
               env.nats_url or (nats_server.url if nats_server else ""))


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    base = from_env({"BILLING_DATA_DIR": str(tmp), "BILLING_ADMIN_TOKEN": TEST_ADMIN_TOKEN})
    tag = uuid.uuid4().hex[:10]
    return dataclasses.replace(
        base, pg_schema=f"t_{tag}", stream_prefix=f"T{tag.upper()}_", **overrides
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def runtime(settings: Settings, server_urls: tuple[str, str]) -> Iterator[Runtime]:
    db, nats_url = server_urls
    rt = Runtime.open(settings, db, nats_url)
    try:
        yield rt
    finally:
        rt.pool.close()
        rt.ledger.close()
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(settings.pg_schema)))
        asyncio.run(_delete_streams(nats_url, rt))


async def _delete_streams(url: str, rt: Runtime) -> None:
    with contextlib.suppress(Exception):
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
        js = nc.jetstream()
        for name in (rt.streams.ledger, rt.streams.dlq):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        with contextlib.suppress(Exception):  # the sealer's (adapters/sealer.py)
            await js.delete_stream(f"{rt.streams.prefix}SEALS")
        await asyncio.wait_for(nc.close(), NATS_CLOSE_TIMEOUT_S)


async def wait_until(
    condition: Callable[[], Any], what: str, deadline_s: float = WAIT_DEADLINE_S
) -> Any:
    """Poll `condition` (sync, run in a thread) until truthy; fail the test at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def running(rt: Runtime, roles: set[str], *,
                  api: ApiRole | None = None) -> AsyncIterator[asyncio.Event]:
    """Run process roles in this event loop for the duration of the block (`api`: the API role
    to run, when the test looks inside it)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_roles(rt, roles, stop, signals=False, api=api))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await close_nats(rt)


NATS_CLOSE_TIMEOUT_S = 5.0


async def close_nats(rt: Runtime) -> None:
    """Close the runtime's NATS connection, bounded: nats-py's close can wait on fetches that a
    cancelled projector left behind."""
    if rt.nc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(rt.nc.close(), NATS_CLOSE_TIMEOUT_S)
        rt.nc = None


def tracked(rt: Runtime, name: str) -> int:
    from adapters.bookkeeping import tracked_position

    with rt.pool.connection() as conn:
        return tracked_position(conn, name)


def reached(rt: Runtime, name: str, position: int) -> bool:
    """Whether read model `name` has tracked `position` (a condition for wait_sync)."""
    return tracked(rt, name) >= position


def table_rows(rt: Runtime, table: str, order_by: str = "id") -> list[tuple[Any, ...]]:
    with rt.pool.connection() as conn:
        return conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY {}").format(
                sql.Identifier(table), sql.SQL(order_by))
        ).fetchall()


def http_status(url: str) -> int:
    """The status of GET url, or 0 while nothing answers there."""
    import httpx

    try:
        return httpx.get(url, timeout=3).status_code
    except httpx.HTTPError:
        return 0


def http_status_is(url: str, status: int) -> bool:
    return http_status(url) == status


@contextlib.contextmanager
def background_roles(rt: Runtime, roles: set[str]) -> Iterator[None]:
    """Run process roles on an event loop in another thread (for sync tests, e.g. hypothesis)."""
    import threading

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def main() -> None:
        ready.set()
        await run_roles(rt, roles, stop, signals=False)
        await close_nats(rt)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def wait_sync(condition: Callable[[], Any], what: str, deadline_s: float = WAIT_DEADLINE_S) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(POLL_S)


class ThreadedWriter:
    """A UsageWriter on its own event loop in a thread, for sync tests (e.g. hypothesis):
    `submit(rows)` returns a concurrent future of the Appended."""

    STOP_TIMEOUT_S = 30.0

    def __init__(self, writer: UsageWriter) -> None:
        import threading

        self.writer = writer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, rows: list[tuple[uuid.UUID, bytes]]) -> concurrent.futures.Future[Appended]:
        return asyncio.run_coroutine_threadsafe(self.writer.append(rows), self.loop)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.writer.stop(), self.loop).result(self.STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.STOP_TIMEOUT_S)
        self.loop.close()


@contextlib.contextmanager
def threaded_writer(rt: Runtime) -> Iterator[ThreadedWriter]:
    writer = ThreadedWriter(UsageWriter(rt.database_url, rt.settings.pg_schema))
    try:
        yield writer
    finally:
        writer.close()
