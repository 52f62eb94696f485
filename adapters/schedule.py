"""The scheduler's record of a job (the invoice run), kept beside bookkeeping's tables: when its
next run is due and when its last run started and finished. `billing status` runs in another
process and cannot ask the scheduler; it reads this record, and one whose next run is long past
says that no scheduler is running."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection

DDL = (
    """CREATE TABLE IF NOT EXISTS scheduled_jobs (
        job text PRIMARY KEY,
        next_run_at timestamptz,
        started_at timestamptz,
        finished_at timestamptz,
        recorded_at timestamptz NOT NULL
    )""",
)

# Each column keeps the latest time written, whatever order the writes commit in: a run's start
# and its end are recorded from two threads.
_RECORD_SQL = """
INSERT INTO scheduled_jobs (job, next_run_at, started_at, finished_at, recorded_at)
VALUES (%(job)s, %(next)s, %(started)s, %(finished)s, %(now)s)
ON CONFLICT (job) DO UPDATE SET
    next_run_at = CASE WHEN EXCLUDED.recorded_at >= scheduled_jobs.recorded_at
                       THEN EXCLUDED.next_run_at ELSE scheduled_jobs.next_run_at END,
    started_at = GREATEST(scheduled_jobs.started_at, EXCLUDED.started_at),
    finished_at = GREATEST(scheduled_jobs.finished_at, EXCLUDED.finished_at),
    recorded_at = GREATEST(scheduled_jobs.recorded_at, EXCLUDED.recorded_at)
"""


@dataclass(frozen=True)
class JobRecord:
    job: str
    next_run_at: datetime | None  # None: the scheduler has no further run of it
    started_at: datetime | None
    finished_at: datetime | None
    recorded_at: datetime


def record(conn: Connection[Any], job: str, *, next_run_at: datetime | None, now: datetime,
           started_at: datetime | None = None, finished_at: datetime | None = None) -> None:
    """Record the job's next run time, and the start or end of a run when given."""
    conn.execute(_RECORD_SQL, {"job": job, "next": next_run_at, "started": started_at,
                               "finished": finished_at, "now": now})


def job_record(conn: Connection[Any], job: str) -> JobRecord | None:
    """The job's record, or None if no scheduler ever recorded it."""
    row = conn.execute("SELECT job, next_run_at, started_at, finished_at, recorded_at"
                       " FROM scheduled_jobs WHERE job = %s", (job,)).fetchone()
    return JobRecord(*row) if row else None
