"""Finds which organisation a resource belongs to, from the read models (for scoped callers)."""

from __future__ import annotations

from uuid import UUID

from psycopg_pool import ConnectionPool

from projections import access


class PgResolver:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def organisation_of(self, kind: str, ident: UUID) -> UUID | None:
        with self._pool.connection() as conn:
            return access.organisation_of(conn, kind, ident)
