"""Postgres connection pools for read models and the runners' bookkeeping tables."""

from __future__ import annotations

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

# Postgres away or a connection lost: the infrastructure's errors, never an entry's or a
# tenant's. Whoever meets them retries or stops; nothing is dead-lettered or failed for them.
TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 16
POOL_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 30_000


def open_pool(
    database_url: str, schema: str, *, max_size: int = POOL_MAX_SIZE, for_projectors: bool = False
) -> ConnectionPool:
    """A pool whose connections use `schema` first and give up on slow statements.

    `for_projectors`: the projectors' own pool. Their commits do not wait for the WAL flush (a
    read model is disposable; its tracking row commits with it), the connections are in
    autocommit (a transaction is always explicit, so a single statement is one round trip),
    and a connection is not checked with a round trip of its own each time it is taken: a
    broken one fails the batch, which the projector retries (and the pool then replaces it)."""
    options = f"-c search_path={schema} -c statement_timeout={STATEMENT_TIMEOUT_MS}"
    if for_projectors:
        options += " -c synchronous_commit=off"
    pool = ConnectionPool(
        database_url,
        min_size=POOL_MIN_SIZE,
        max_size=max_size,
        timeout=POOL_TIMEOUT_S,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "options": options,
                "autocommit": for_projectors},
        check=None if for_projectors else ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=False)
    return pool
