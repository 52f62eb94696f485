"""Tables the runners keep beside the read models: relay position, projection tracking, dead
letters, and the organisations the last invoice run of each period could not invoice. Also the
queries operators and /metrics use to see lag, missing positions and blocked organisations."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from domain.records import Blocked

DDL = (
    """CREATE TABLE IF NOT EXISTS relay_positions (
        name text PRIMARY KEY,
        position bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS projection_tracking (
        name text PRIMARY KEY,
        position bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS projection_dead_letters (
        name text NOT NULL,
        position bigint NOT NULL,
        topic text NOT NULL,
        error text NOT NULL,
        attempts int NOT NULL,
        failed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, position)
    )""",
    # Bumped by every rebuild and re-drive: rows changed below the tracking position, which
    # whoever follows the model by position (the API's caches) must reload.
    "ALTER TABLE projection_tracking ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS invoice_run_blocked (
        period text NOT NULL,
        organisation_id uuid NOT NULL,
        name text NOT NULL,
        read_models jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (period, organisation_id)
    )""",
)

DLQ_LIST_MAX_ROWS = 1000
DLQ_PAGE_ROWS = 1000  # rows per read when every dead letter must be seen (dead_letter_pages)


def lock_key(*parts: str) -> int:
    """A stable advisory-lock key (int8) for a named role within a schema."""
    return zlib.crc32(":".join(parts).encode())


def tracked_position(conn: Connection[Any], name: str) -> int:
    row = conn.execute("SELECT position FROM projection_tracking WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def relay_position(conn: Connection[Any], name: str = "relay") -> int:
    row = conn.execute("SELECT position FROM relay_positions WHERE name = %s", (name,)).fetchone()
    return int(row[0]) if row else 0


def all_tracking(conn: Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT name, position FROM projection_tracking").fetchall()
    return {str(name): int(pos) for name, pos in rows}


def dead_letters(conn: Connection[Any], name: str | None = None) -> list[dict[str, Any]]:
    """Unresolved dead letters: the ledger positions a read model is missing."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT name, position, topic, error, attempts, failed_at FROM projection_dead_letters"
            " WHERE %(name)s::text IS NULL OR name = %(name)s ORDER BY name, position LIMIT %(n)s",
            {"name": name, "n": DLQ_LIST_MAX_ROWS},
        )
        return cur.fetchall()


def dead_letters_page(conn: Connection[Any], names: Sequence[str], after: tuple[str, int] | None,
                      limit: int = DLQ_PAGE_ROWS) -> list[dict[str, Any]]:
    """Up to `limit` dead letters of the read models `names`, in (name, position) order, after
    the key `after` (None: from the first)."""
    assert 0 < limit <= DLQ_PAGE_ROWS
    name, position = after if after is not None else ("", -1)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT name, position, topic, error, attempts, failed_at FROM projection_dead_letters"
            " WHERE name = ANY(%(names)s) AND (name, position) > (%(name)s, %(position)s)"
            " ORDER BY name, position LIMIT %(n)s",
            {"names": list(names), "name": name, "position": position, "n": limit},
        )
        return cur.fetchall()


def dead_letter_pages(conn: Connection[Any], names: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    """Every dead letter of the read models `names`, however many, a page at a time (keyed by
    the primary key, so a row a re-drive deletes meanwhile only shortens the walk)."""
    after: tuple[str, int] | None = None
    while True:
        page = dead_letters_page(conn, names, after)
        if page:
            yield page
        if len(page) < DLQ_PAGE_ROWS:
            return
        after = (str(page[-1]["name"]), int(page[-1]["position"]))


def dead_letter_counts(conn: Connection[Any]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT name, count(*) FROM projection_dead_letters GROUP BY name"
    ).fetchall()
    return {str(name): int(n) for name, n in rows}


def record_blocked(conn: Connection[Any], period: str, blocked: Sequence[Blocked]) -> None:
    """The organisations the latest run of `period` could not invoice, replacing the last run's
    list: what /metrics and `billing status` show until a run invoices them."""
    conn.execute("DELETE FROM invoice_run_blocked WHERE period = %s", (period,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO invoice_run_blocked (period, organisation_id, name, read_models)"
            " VALUES (%s, %s, %s, %s)",
            [(period, b.organisation_id, b.name, Jsonb(b.read_models)) for b in blocked])


def blocked_organisations(conn: Connection[Any]) -> list[dict[str, Any]]:
    """Every organisation a run left blocked, by period then name (bounded by the organisations
    that exist: one row per organisation and period)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT period, organisation_id, name, read_models, recorded_at"
                    " FROM invoice_run_blocked ORDER BY period, name, organisation_id")
        return cur.fetchall()


def blocked_counts(conn: Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT period, count(*) FROM invoice_run_blocked GROUP BY period").fetchall()
    return {str(period): int(n) for period, n in rows}
