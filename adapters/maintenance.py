"""Operator work on read models: rebuild from position 0, and re-drive dead letters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eventsourcing.utils import get_topic
from psycopg import sql
from psycopg_pool import ConnectionPool

from adapters.bookkeeping import dead_letters
from adapters.ledger import LedgerStore
from projections.base import ReadModel

REBUILD_PAGE_ROWS = 5000
REBUILD_LOCK_TIMEOUT_S = 30

Progress = Callable[[int, int], None]  # (position reached, ledger head)


def model_topics(model: ReadModel) -> frozenset[str]:
    return frozenset(get_topic(cls) for cls in model.handlers)


def ensure_tables(pool: ConnectionPool, model: ReadModel) -> None:
    with pool.connection() as conn, conn.transaction():
        for statement in model.ddl:
            conn.execute(statement)


def rebuild(
    pool: ConnectionPool, ledger: LedgerStore, model: ReadModel, progress: Progress | None = None
) -> int:
    """Empty one read model and replay the whole ledger into it, in one transaction: readers see
    the old model until the new one commits; the live projector waits on the tracking row and
    then carries on after the rebuilt position. Returns the position reached."""
    head = ledger.head()
    topics = model_topics(model)
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("SET LOCAL lock_timeout = '{}s'").format(REBUILD_LOCK_TIMEOUT_S))
        cur.execute(
            "INSERT INTO projection_tracking (name, position) VALUES (%s, 0)"
            " ON CONFLICT (name) DO NOTHING", (model.name,),
        )
        cur.execute("SELECT 1 FROM projection_tracking WHERE name = %s FOR UPDATE", (model.name,))
        cur.execute("SET LOCAL statement_timeout = 0")
        for table in model.tables:
            cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        cur.execute("DELETE FROM projection_dead_letters WHERE name = %s", (model.name,))
        position = 0
        while position < head:
            page = ledger.read_after(position, REBUILD_PAGE_ROWS, stop=head)
            if not page:
                break
            model.apply_all(cur, [(ledger.decode(n), n.id) for n in page if n.topic in topics])
            position = page[-1].id
            if progress:
                progress(position, head)
        position = head
        cur.execute(
            "UPDATE projection_tracking SET position = %s, updated_at = now() WHERE name = %s",
            (position, model.name),
        )
    if progress:
        progress(position, head)
    return position


@dataclass(frozen=True)
class RedriveResult:
    applied: list[int]
    still_failing: dict[int, str]


def redrive(pool: ConnectionPool, ledger: LedgerStore, model: ReadModel) -> RedriveResult:
    """Apply each dead-lettered entry again, from the ledger, in ledger order. One that applies
    leaves the dead-letter list in the same transaction; one that fails again stays on it."""
    with pool.connection() as conn:
        positions = [int(r["position"]) for r in dead_letters(conn, model.name)]
    applied: list[int] = []
    failing: dict[int, str] = {}
    for position in positions:
        page = ledger.read_after(position - 1, 1, stop=position)
        try:
            with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                model.apply_all(cur, [(ledger.decode(n), n.id) for n in page])
                cur.execute(
                    "DELETE FROM projection_dead_letters WHERE name = %s AND position = %s",
                    (model.name, position),
                )
            applied.append(position)
        except Exception as e:
            failing[position] = f"{type(e).__name__}: {e}"
    return RedriveResult(applied, failing)
