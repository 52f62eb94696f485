"""Operator work on read models: rebuild from position 0, and re-drive dead letters.

Both take the model's tracking row lock, as a projector's transaction does, so neither
interleaves with a projector's commit; the rules are in docs/PROJECTIONS.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eventsourcing.utils import get_topic
from psycopg import sql
from psycopg_pool import ConnectionPool

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
    then carries on after the rebuilt position. Returns the position reached.

    The ledger head is read once the lock is held: a projector commit that came before the lock
    is then within the replay, never dropped by the DELETE and left out above the head."""
    topics = model_topics(model)
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("SET LOCAL lock_timeout = '{}s'").format(REBUILD_LOCK_TIMEOUT_S))
        cur.execute(
            "INSERT INTO projection_tracking (name, position) VALUES (%s, 0)"
            " ON CONFLICT (name) DO NOTHING", (model.name,),
        )
        cur.execute("SELECT 1 FROM projection_tracking WHERE name = %s FOR UPDATE", (model.name,))
        head = ledger.head()
        cur.execute("SET LOCAL statement_timeout = 0")
        for table in model.tables:
            cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        cur.execute("DELETE FROM projection_dead_letters WHERE name = %s", (model.name,))
        position = 0
        while position < head:
            # Only the model's own topics: a small model's rebuild (and so its re-drive) holds
            # the tracking lock for a read of its entries, not of the whole usage ledger.
            page = ledger.read_after(position, REBUILD_PAGE_ROWS, stop=head, topics=sorted(topics))
            if not page:
                break
            model.apply_all(cur, [(ledger.decode(n), n.id) for n in page])
            position = page[-1].id
            if progress:
                progress(position, head)
        position = head
        cur.execute(
            "UPDATE projection_tracking SET position = %s, generation = generation + 1,"
            " updated_at = now() WHERE name = %s",
            (position, model.name),
        )
    if progress:
        progress(position, head)
    return position


@dataclass(frozen=True)
class RedriveResult:
    applied: list[int]
    still_failing: dict[int, str]


# Claims the next dead letter after a position: deleted here, applied in the same transaction,
# so a concurrent re-drive (or one working after a rebuild cleared the list) never gets it too.
_CLAIM_NEXT = (
    "DELETE FROM projection_dead_letters WHERE name = %(name)s AND position = ("
    " SELECT position FROM projection_dead_letters WHERE name = %(name)s AND position > %(after)s"
    # Order-free entries only: one dead-lettered while this re-drive runs (a meter's
    # redefinition, say) is left for the next re-drive, which rebuilds.
    " AND topic = ANY(%(topics)s)"
    " ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING position")


def redrive(pool: ConnectionPool, ledger: LedgerStore, model: ReadModel) -> RedriveResult:
    """Apply the model's dead-lettered entries again, from the ledger.

    Entries of order-free events only (usage, `ReadModel.order_free`) are applied one by one, in
    ledger order, each in its own transaction: under the model's tracking lock, the dead-letter
    row is deleted (`DELETE ... RETURNING`) and only an entry that delete returned is applied.
    One that fails again rolls back, so it stays on the list. Any number of re-drives may run at
    once: each entry is applied by one of them.

    Any other dead letter cannot be applied after later entries of the same row (an older
    reactivation over a newer suspension, an update before its row's creation): the model is
    rebuilt instead, every entry in ledger order, in one transaction; if an entry still fails,
    nothing changes and every dead letter stays."""
    with pool.connection() as conn:
        letters = conn.execute(
            "SELECT position, topic FROM projection_dead_letters WHERE name = %s ORDER BY position",
            (model.name,)).fetchall()
    order_free = sorted(get_topic(cls) for cls in model.order_free)
    if not {str(topic) for _, topic in letters} <= set(order_free):
        return _redrive_by_rebuild(pool, ledger, model, [int(position) for position, _ in letters])
    applied: list[int] = []
    failing: dict[int, str] = {}
    after = 0
    while True:
        claimed: int | None = None
        try:
            with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT 1 FROM projection_tracking WHERE name = %s FOR UPDATE",
                            (model.name,))
                row = cur.execute(_CLAIM_NEXT, {"name": model.name, "after": after,
                                                "topics": order_free}).fetchone()
                if row is None:
                    break
                claimed = int(row[0])
                page = ledger.read_after(claimed - 1, 1, stop=claimed)
                model.apply_all(cur, [(ledger.decode(n), n.id) for n in page])
                cur.execute("UPDATE projection_tracking SET generation = generation + 1"
                            " WHERE name = %s", (model.name,))
            applied.append(claimed)
        except Exception as e:
            if claimed is None:
                raise  # not an entry's failure: the claim itself
            failing[claimed] = f"{type(e).__name__}: {e}"
        after = claimed
    return RedriveResult(applied, failing)


def _redrive_by_rebuild(pool: ConnectionPool, ledger: LedgerStore, model: ReadModel,
                        positions: list[int]) -> RedriveResult:
    try:
        rebuild(pool, ledger, model)
    except Exception as e:  # an entry still fails: the rebuild rolled back whole
        return RedriveResult([], dict.fromkeys(positions, f"{type(e).__name__}: {e}"))
    return RedriveResult(positions, {})
