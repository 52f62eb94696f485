"""Reconciliation wired to a runtime: the replay and checks over its ledger and read models
(against Razorpay too when configured, and with infra.wiring.EXTRA_CHECKS), recorded in the
ledger. The CLI, the admin API and the scheduler all reconcile through here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO
from uuid import UUID, uuid4

import msgspec
import psycopg
from tqdm import tqdm

from adapters import bookkeeping
from adapters.reconciliation import Reconciler
from adapters.replay import Progress, ReplayFailed
from adapters.sealer import seal_pending
from domain.audit import Actor
from domain.errors import NotFound
from domain.reconciliation import Report, replay_failed_result
from domain.services.reconciliations import ReconciliationService
from infra.wiring import EXTRA_CHECKS, READ_MODELS, Runtime
from projections import reconciliations

log = logging.getLogger("billing.reconcile")


def reconciler(rt: Runtime) -> Reconciler:
    """The replay and checks over this runtime's ledger and read models."""
    return Reconciler(rt.database_url, rt.settings.pg_schema, rt.ledger.events_table,
                      READ_MODELS, rt.gateway(), EXTRA_CHECKS)


def reconcile(rt: Runtime, *, organisation_id: UUID | None = None, period: str | None = None,
              actor: Actor | None, progress: Progress | None = None) -> tuple[Report, int]:
    """Run a reconciliation and record it in the ledger (ReconciliationCompleted): the report
    and the ledger position of that record. The ledger is sealed up to its head first (what the
    running sealer would do within a second), so that check 5 covers every entry replayed."""
    seal_pending(rt.database_url, rt.settings.pg_schema, events_table=rt.ledger.events_table)
    started = datetime.now(UTC)
    try:
        report = reconciler(rt).run(organisation_id=organisation_id, period=period,
                                    progress=progress)
    except ReplayFailed as e:  # a poison entry: a recorded failure naming it, not a crash
        report = Report(uuid4(), started, datetime.now(UTC), rt.ledger.head(), 0,
                        (replay_failed_result(e.position, str(e)),), organisation_id, period)
    written = ReconciliationService(rt.ledger).record(report, actor=actor)
    return report, written.position


# ---- the CLI: `billing reconcile`, and its line in `billing status` ---------------------------

RECONCILE_EXIT_DIFFERENCES = 1  # `billing reconcile` found a difference (or a silent check)
RECONCILE_EXIT_BAD_ARGUMENTS = 2  # e.g. --organisation names no organisation of the ledger
VALUE_SHOWN_MAX_CHARS = 160  # a difference's expected and actual values, in the CLI's table


def add_reconcile_parser(sub: Any) -> None:
    rc = sub.add_parser("reconcile", help="replay the ledger and check every read model, invoice,"
                        " payment and invoice number against it; records the result in the"
                        " ledger; exit 1 on any difference")
    rc.add_argument("--period", help="only this billing period (YYYY-MM)")
    rc.add_argument("--organisation", type=UUID, help="only this organisation's rows")


def reconcile_command(rt: Runtime, args: argparse.Namespace, out: TextIO, actor: Actor) -> int:
    head = max(rt.ledger.head(), 1)
    with tqdm(total=head, unit="ev", unit_scale=True, desc="replay", file=sys.stderr,
              mininterval=0.5) as bar:
        def progress(events: int, position: int) -> None:
            bar.n = position
            bar.set_postfix(events=events, refresh=False)
            bar.refresh()

        try:
            report, position = reconcile(rt, organisation_id=args.organisation,
                                         period=args.period, actor=actor, progress=progress)
        except NotFound as e:
            sys.stderr.write(f"billing: {e}\n")
            return RECONCILE_EXIT_BAD_ARGUMENTS
    write_table(report, out)
    out.write(f"recorded in the ledger at position {position}\n")
    return 0 if report.ok else RECONCILE_EXIT_DIFFERENCES


def write_table(report: Report, out: TextIO) -> None:
    """The report as a readable table: one line per check, then every difference."""
    verdict = "ok" if report.ok else f"FAILED ({report.difference_count} differences)"
    scope = "".join([f" organisation {report.organisation_id}" if report.organisation_id else "",
                     f" period {report.period}" if report.period else ""])
    out.write(f"reconciliation {report.id}{scope}: ledger up to position "
              f"{report.ledger_position}, {report.events_replayed} entries replayed: {verdict}\n")
    out.write(f"{'check':<12} {'result':<8} {'compared':>9} {'facts':>9} {'differences':>11}\n")
    for c in report.checks:
        result = "skipped" if c.skipped else "ok" if c.ok else "SILENT" if c.silent else "FAILED"
        out.write(f"{c.name:<12} {result:<8} {c.compared:>9} {c.facts:>9} "
                  f"{c.difference_count:>11}  {c.note}\n")
    for c in report.checks:
        if c.silent:
            out.write(f"  {c.name}: compared nothing while the ledger holds {c.facts} facts of"
                      " its kind\n")
        for d in c.differences:
            positions = ", ".join(map(str, d.positions)) or "-"
            out.write(f"  {c.name} {d.subject} [{d.key}] {d.kind}: expected "
                      f"{_shown(d.expected)}, actual {_shown(d.actual)}; positions {positions}\n")


def _shown(value: Any) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= VALUE_SHOWN_MAX_CHARS else text[:VALUE_SHOWN_MAX_CHARS] + "..."


def reconciliation_status(rt: Runtime, out: TextIO) -> bool:
    """`billing status`'s line on the newest reconciliation; True when it failed."""
    with rt.pool.connection() as conn:
        newest = reconciliations.latest(conn, 1)
    if not newest:
        out.write("reconciliation: none has run yet (`billing reconcile`)\n")
        return False
    r = newest[0]
    verdict = "ok" if r.ok else f"FAILED with {r.differences} differences"
    out.write(f"reconciliation: the newest ({r.id}, {r.completed_at.isoformat(timespec='minutes')},"
              f" up to position {r.ledger_position}) {verdict}\n")
    return not r.ok


# ---- the daily run on the scheduler -----------------------------------------------------------

RECONCILE_DAILY_AT_UTC = (2, 30)  # (hour, minute): the daily reconciliation, when traffic is low


def reconcile_once(rt: Runtime) -> Report | None:
    """A reconciliation by the scheduler, unless another process's is running (advisory lock):
    its report (recorded), or None when it was left to the other."""
    key = bookkeeping.lock_key(rt.settings.pg_schema, "reconcile")
    with psycopg.connect(rt.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not (row and row[0]):
            return None
        try:
            return reconcile(rt, actor=None)[0]
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


async def reconciliation_job(rt: Runtime) -> None:
    """The daily job: a failed reconciliation is logged as an error (and shows in /metrics and
    `billing status` through the reconciliations read model)."""
    try:
        report = await asyncio.to_thread(reconcile_once, rt)
    except Exception:
        log.exception("the daily reconciliation could not run")
        return
    if report is None:
        return
    if report.ok:
        log.info("reconciliation %s ok up to ledger position %d", report.id,
                 report.ledger_position)
    else:
        log.error("reconciliation %s FAILED: %d differences up to ledger position %d (`billing "
                  "reconcile` or GET /admin/v1/reconciliations/%s)", report.id,
                  report.difference_count, report.ledger_position, report.id)
