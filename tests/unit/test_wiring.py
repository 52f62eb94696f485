"""The composition root builds without acting: build_api touches no database, ledger or file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from psycopg_pool import ConnectionPool

from adapters import bus
from adapters.ledger import LedgerStore
from infra.settings import from_env
from infra.wiring import Runtime, build_api

UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:1/none"  # port 1: any connection would fail


class Untouchable:
    """Stands for the ledger: any use at all fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the ledger was used while building: {name}")


def test_building_the_api_role_opens_nothing_and_writes_nothing(tmp_path: Path) -> None:
    settings = from_env({"BILLING_DATA_DIR": str(tmp_path / "data")})
    pool = ConnectionPool(UNREACHABLE_URL, open=False)
    rt = Runtime(settings, UNREACHABLE_URL, "", cast(LedgerStore, Untouchable()), pool,
                 bus.Streams(settings.stream_prefix))
    role = build_api(rt, admin_token="given")
    assert role.deps.usage is role.writer and role.deps.tokens is role.token_cache
    assert pool.closed  # never opened
    assert not (tmp_path / "data").exists()  # no admin-token file generated
