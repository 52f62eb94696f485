"""Postgres connection pools for read models and the runners' bookkeeping tables."""

from __future__ import annotations

from psycopg_pool import ConnectionPool

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 16
POOL_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 30_000


def open_pool(database_url: str, schema: str, *, max_size: int = POOL_MAX_SIZE) -> ConnectionPool:
    """A pool whose connections use `schema` first and give up on slow statements."""
    pool = ConnectionPool(
        database_url,
        min_size=POOL_MIN_SIZE,
        max_size=max_size,
        timeout=POOL_TIMEOUT_S,
        kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c search_path={schema} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        },
        check=ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=False)
    return pool
