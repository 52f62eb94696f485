"""The invoice runs' history: one row per run (period, who started it, progress, counts, and
each organisation it did not invoice with why), GET /admin/v1/invoice-runs and `billing status`.

Not a projection of ledger events: the run writes its own row as it goes (started, progress
after every batch, finished), like the runners' bookkeeping tables (adapters/bookkeeping.py).
What the run drafted is in the ledger; this row says what a run did and how far it got. A run
whose process died leaves its row "running"; the next run, holding the run lock, marks it
"interrupted" (the lock proves that nobody is running it any more).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection
from psycopg.types.json import Jsonb

from domain.records import RunEntry, RunResult
from projections.base import all_rows

RUNNING = "running"
DONE = "done"
FAILED = "failed"  # the run stopped on an error of the infrastructure (the log has it)
INTERRUPTED = "interrupted"  # its process died; a later run does the rest (drafting is idempotent)
LIST_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS invoice_runs (
        id uuid PRIMARY KEY,
        period text NOT NULL,
        status text NOT NULL,
        started_by text NOT NULL,
        started_at timestamptz NOT NULL,
        finished_at timestamptz,
        organisations_total int NOT NULL DEFAULT 0,
        organisations_done int NOT NULL DEFAULT 0,
        created int NOT NULL DEFAULT 0,
        existing int NOT NULL DEFAULT 0,
        skipped int NOT NULL DEFAULT 0,
        not_due int NOT NULL DEFAULT 0,
        failed int NOT NULL DEFAULT 0,
        blocked int NOT NULL DEFAULT 0,
        organisations jsonb NOT NULL DEFAULT '[]',
        more int NOT NULL DEFAULT 0,
        error text
    )""",
    "CREATE INDEX IF NOT EXISTS invoice_runs_started ON invoice_runs (started_at DESC, id DESC)",
)


class RunEntryRow(msgspec.Struct, frozen=True):
    """One organisation a run did not invoice, and why."""

    organisation_id: UUID
    name: str
    outcome: str  # skipped, not_due, blocked or failed
    reason: str


class InvoiceRunRow(msgspec.Struct, frozen=True):
    id: UUID
    period: str
    status: str  # running | done | failed | interrupted
    started_by: str  # the principal's id, or "scheduler"
    started_at: datetime
    finished_at: datetime | None
    organisations_total: int
    organisations_done: int
    created: int
    existing: int
    skipped: int
    not_due: int
    failed: int
    blocked: int
    organisations: list[RunEntryRow]
    more: int
    error: str | None


_COLUMNS = ("id, period, status, started_by, started_at, finished_at, organisations_total,"
            " organisations_done, created, existing, skipped, not_due, failed, blocked,"
            " organisations, more, error")


def _entries(entries: Sequence[RunEntry]) -> Jsonb:
    return Jsonb([{"organisation_id": str(e.organisation_id), "name": e.name,
                   "outcome": e.outcome, "reason": e.reason} for e in entries])


def interrupt_running(conn: Connection[Any], at: datetime) -> int:
    """Mark the runs still "running" as interrupted: called under the run lock, so none is."""
    cur = conn.execute("UPDATE invoice_runs SET status = %s, finished_at = %s WHERE status = %s",
                       (INTERRUPTED, at, RUNNING))
    return cur.rowcount


def started(conn: Connection[Any], run_id: UUID, period: str, started_by: str,
            at: datetime, total: int) -> None:
    conn.execute("INSERT INTO invoice_runs (id, period, status, started_by, started_at,"
                 " organisations_total) VALUES (%s, %s, %s, %s, %s, %s)",
                 (run_id, period, RUNNING, started_by, at, total))


def progressed(conn: Connection[Any], run_id: UUID, done: int, result: RunResult) -> None:
    """The counts so far, after a batch."""
    conn.execute(
        "UPDATE invoice_runs SET organisations_done = %s, created = %s, existing = %s,"
        " skipped = %s, not_due = %s, failed = %s, blocked = %s, organisations = %s, more = %s"
        " WHERE id = %s",
        (done, result.created, result.existing, result.skipped, result.not_due, result.failed,
         len(result.blocked), _entries(result.entries), result.more, run_id))


def finished(conn: Connection[Any], run_id: UUID, done: int, result: RunResult, at: datetime,
             error: str | None = None) -> None:
    progressed(conn, run_id, done, result)
    # Done: every organisation was gone through, so the total is what was done (the count at
    # the start may have named one twice: subscribed, and missing from the subscriptions).
    conn.execute("UPDATE invoice_runs SET status = %s, finished_at = %s, error = %s,"
                 " organisations_total = CASE WHEN %s THEN organisations_total ELSE %s END"
                 " WHERE id = %s",
                 (FAILED if error else DONE, at, error, bool(error), done, run_id))


def get(conn: Connection[Any], run_id: UUID) -> InvoiceRunRow | None:
    rows = all_rows(conn, InvoiceRunRow, f"SELECT {_COLUMNS} FROM invoice_runs WHERE id = %s",
                    (run_id,))
    return rows[0] if rows else None


def page(conn: Connection[Any], limit: int, after: tuple[datetime, UUID] | None,
         period: str | None = None) -> list[InvoiceRunRow]:
    """Runs newest first, after the cursor (started_at, id) when given."""
    assert 0 < limit <= LIST_MAX_ROWS
    return all_rows(
        conn, InvoiceRunRow,
        f"SELECT {_COLUMNS} FROM invoice_runs"
        " WHERE (%(period)s::text IS NULL OR period = %(period)s)"
        " AND (%(at)s::timestamptz IS NULL OR (started_at, id) < (%(at)s, %(id)s))"
        " ORDER BY started_at DESC, id DESC LIMIT %(limit)s",
        {"period": period, "at": after[0] if after else None, "id": after[1] if after else None,
         "limit": limit})


def latest(conn: Connection[Any]) -> InvoiceRunRow | None:
    """The newest run, for `billing status`."""
    rows = page(conn, 1, None)
    return rows[0] if rows else None
