"""The reconciliations read model: one row per completed reconciliation (its verdict, the ledger
position it covers, the report and its hash), and the queries of the admin API, the CLI's
status and /metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor

from domain.reconciliation import Reconciliation
from projections.base import ReadModel, all_rows, one_row

NAME = "reconciliations"
LIST_MAX_ROWS = 100

DDL = (
    """CREATE TABLE IF NOT EXISTS reconciliations (
        id uuid PRIMARY KEY,
        completed_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL,
        ok boolean NOT NULL,
        differences integer NOT NULL,
        report_sha256 text NOT NULL,
        report jsonb NOT NULL,
        organisation_id uuid,
        period text,
        recorded_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS reconciliations_by_completed ON reconciliations (completed_at, id)",
)


def _completed(cur: Cursor[Any], e: Reconciliation.Completed, position: int) -> None:
    cur.execute(
        "INSERT INTO reconciliations (id, completed_at, ledger_position, ok, differences,"
        " report_sha256, report, organisation_id, period, recorded_position)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)",
        (e.originator_id, e.timestamp, e.ledger_position, e.ok, e.differences, e.report_sha256,
         e.report, e.organisation_id, e.period, position),
    )


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("reconciliations",),
    handlers={Reconciliation.Completed: _completed},
)


class ReconciliationRow(msgspec.Struct, frozen=True):
    id: UUID
    completed_at: datetime
    ledger_position: int
    ok: bool
    differences: int
    report_sha256: str
    organisation_id: UUID | None
    period: str | None


class ReconciliationDetail(ReconciliationRow, frozen=True):
    report: dict[str, Any]


_COLUMNS = ("SELECT id, completed_at, ledger_position, ok, differences, report_sha256,"
            " organisation_id, period")


def latest(conn: Connection[Any], limit: int = LIST_MAX_ROWS) -> list[ReconciliationRow]:
    """The newest reconciliations first."""
    return all_rows(conn, ReconciliationRow,
                    _COLUMNS + " FROM reconciliations ORDER BY completed_at DESC, id LIMIT %s",
                    (min(limit, LIST_MAX_ROWS),))


def get(conn: Connection[Any], ident: UUID) -> ReconciliationDetail | None:
    return one_row(conn, ReconciliationDetail,
                   _COLUMNS + ", report FROM reconciliations WHERE id = %s", (ident,))


def last_failed(conn: Connection[Any]) -> bool:
    """Whether the newest reconciliation failed (False when there is none)."""
    row = conn.execute("SELECT ok FROM reconciliations ORDER BY completed_at DESC, id LIMIT 1"
                       ).fetchone()
    return bool(row is not None and not row[0])
