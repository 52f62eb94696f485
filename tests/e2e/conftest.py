"""A running service (API + relay + projectors, in this event loop) shared by a test module."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from infra.embedded import free_port
from infra.settings import Settings
from infra.wiring import ApiRole, Runtime, admin_token, build_api
from tests.conftest import TEST_ADMIN_TOKEN, http_status, make_settings, running, wait_until

AUTH = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


@dataclasses.dataclass
class Api:
    http: httpx.AsyncClient
    rt: Runtime
    role: ApiRole

    def count_where(self, table: str, condition: str) -> int:
        with self.rt.pool.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                sql.Identifier(table), sql.SQL(condition))).fetchone()
            assert row is not None
            return int(row[0])

    def count(self, table: str) -> int:
        with self.rt.pool.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            assert row is not None
            return int(row[0])


@contextlib.asynccontextmanager
async def serving(settings: Settings, server_urls: tuple[str, str]) -> AsyncIterator[Api]:
    """The API, relay and projectors of `settings` running here until the block ends; its
    schema dropped afterwards."""
    rt = Runtime.open(settings, *server_urls)
    role = build_api(rt, admin_token=admin_token(settings))
    base = f"http://127.0.0.1:{settings.port}"
    try:
        async with running(rt, {"api", "relay", "project"}, api=role), httpx.AsyncClient(
            base_url=base, timeout=10
        ) as http:
            await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "up")
            yield Api(http, rt, role)
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, rt)


@pytest.fixture(scope="module")
async def api(
    tmp_path_factory: pytest.TempPathFactory, server_urls: tuple[str, str]
) -> AsyncIterator[Api]:
    settings = make_settings(Path(tmp_path_factory.mktemp("api")), port=free_port())
    async with serving(settings, server_urls) as served:
        yield served


def close_and_drop(database_url: str, schema: str, *runtimes: Runtime) -> None:
    """Close the runtimes' pools and ledgers, then drop the schema they shared."""
    for rt in runtimes:
        rt.pool.close()
        rt.ledger.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
