"""The scheduler keeps a record of the invoice run (adapters/schedule.py) as it runs it, and
`billing status`, another process, reads it: when the next run is due and for which periods,
when the last one started and finished, or that no scheduler is running it any more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters.schedule import JobRecord, job_record, record
from domain.period import due_periods
from infra.cli import SCHEDULE_LATE_S, next_run_line
from infra.scheduler import CATCH_UP_PERIODS, INVOICE_RUN_EVERY_MIN, INVOICE_RUN_JOB, start
from infra.wiring import Runtime
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio
SUBMIT_SLACK_S = 10  # between the job's first fire time and the record of its start


def _finished(rt: Runtime) -> JobRecord | None:
    with rt.pool.connection() as conn:
        job = job_record(conn, INVOICE_RUN_JOB)
    return job if job is not None and job.finished_at is not None else None


def _stopped(rt: Runtime) -> JobRecord | None:
    with rt.pool.connection() as conn:
        job = job_record(conn, INVOICE_RUN_JOB)
    return job if job is not None and job.next_run_at is None else None


def _minute(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="minutes")


async def test_status_reads_the_next_invoice_run_the_scheduler_recorded(runtime: Runtime) -> None:
    every = (f"every {INVOICE_RUN_EVERY_MIN} min while `billing serve` runs (the first at its "
             "start)")
    now = datetime.now(UTC)
    due = ", ".join(sorted(due_periods(now, timedelta(hours=runtime.settings.grace_hours),
                                       CATCH_UP_PERIODS)))
    assert next_run_line(runtime, now) == f"next invoice run: {every}, for {due}\n"  # none yet

    scheduler = start(runtime)  # as run_roles starts it for `serve`
    try:
        job = await wait_until(lambda: _finished(runtime), "the first invoice run recorded")
        assert job.started_at is not None and job.finished_at is not None
        assert job.next_run_at is not None
        assert now <= job.started_at <= job.finished_at
        expected_next = job.started_at + timedelta(minutes=INVOICE_RUN_EVERY_MIN)
        assert abs(job.next_run_at - expected_next) < timedelta(seconds=SUBMIT_SLACK_S)
        last = f"the last started {_minute(job.started_at)}, finished {_minute(job.finished_at)}"
        assert next_run_line(runtime, job.finished_at) == (
            f"next invoice run: {_minute(job.next_run_at)}, for {due} ({every}; {last})\n")
    finally:
        scheduler.shutdown(wait=False)  # as `serve` stops

    # AsyncIOScheduler shuts down on the loop's next turn: wait for its last record.
    stopped = await wait_until(lambda: _stopped(runtime), "the scheduler's stop recorded")
    assert next_run_line(runtime, datetime.now(UTC)) == (
        f"next invoice run: none scheduled: the scheduler stopped at "
        f"{_minute(stopped.recorded_at)}; is `billing serve` running? ({every}; {last})\n")

    # A `serve` killed outright records nothing: once its next run is well past, status says so.
    with runtime.pool.connection() as conn:
        record(conn, INVOICE_RUN_JOB, next_run_at=job.next_run_at, now=datetime.now(UTC))
    late = job.next_run_at + timedelta(seconds=SCHEDULE_LATE_S + 1)
    assert next_run_line(runtime, late) == (
        f"next invoice run: none scheduled: one was due {_minute(job.next_run_at)} and no "
        f"scheduler has run it since; is `billing serve` running? ({every}; {last})\n")


def test_the_scheduler_runs_as_a_role_of_its_own_and_stops_cleanly(runtime: Runtime) -> None:
    """`billing scheduler` (infra/deploy/): the scheduler alone in a process, no API, no worker.
    It runs the invoice job (its record says so) and exits 0 on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import wait_sync

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_URL", "NATS_URL"))}
    env |= {"DATABASE_URL": runtime.database_url, "NATS_URL": runtime.nats_url,
            "BILLING_PG_SCHEMA": runtime.settings.pg_schema,
            "BILLING_STREAM_PREFIX": runtime.settings.stream_prefix,
            "BILLING_DATA_DIR": str(runtime.settings.data_dir), "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "scheduler"], env=env,
                            cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        job = wait_sync(lambda: _finished(runtime) or proc.poll() is not None,
                        "the scheduler role's first invoice run")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert isinstance(job, JobRecord) and job.next_run_at is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
