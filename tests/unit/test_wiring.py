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


def unconnected_runtime(data_dir: Path) -> Runtime:
    """A Runtime whose pool is never opened and whose ledger fails on any use."""
    settings = from_env({"BILLING_DATA_DIR": str(data_dir)})
    return Runtime(settings, UNREACHABLE_URL, "", cast(LedgerStore, Untouchable()),
                   ConnectionPool(UNREACHABLE_URL, open=False), bus.Streams(settings.stream_prefix))


def test_building_the_api_role_opens_nothing_and_writes_nothing(tmp_path: Path) -> None:
    rt = unconnected_runtime(tmp_path / "data")
    role = build_api(rt, admin_token="given")
    assert role.deps.usage is role.writer and role.deps.tokens is role.token_cache
    assert rt.pool.closed  # never opened
    assert not (tmp_path / "data").exists()  # no admin-token file generated
