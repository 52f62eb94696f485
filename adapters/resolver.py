"""Finds which organisation a resource belongs to, from the read models (for scoped callers)."""

from __future__ import annotations

from uuid import UUID

from psycopg_pool import ConnectionPool

from projections import access
from projections import payments as payments_view

PAYMENT = "payment"


class PgResolver:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def organisation_of(self, kind: str, ident: UUID) -> UUID | None:
        with self._pool.connection() as conn:
            if kind == PAYMENT:
                # A payment of no order of ours has no organisation: no scoped caller's.
                row = payments_view.get(conn, ident)
                return row.organisation_id if row is not None else None
            return access.organisation_of(conn, kind, ident)
