"""Billing day in a process of its own, for tests that SIGKILL it (test_invoice_run_kill.py):
the invoice run of a period, then finalize-and-number of its drafts, each printing a progress
line after every batch ("drafted <n>", "finalized <n>") and "done" at the end, with the
production batch sizes (adapters/invoice_run.py) and one helper process drafting batches too
(adapters/invoice_run_helpers.py), as the service runs it. Exit 0 when done, 3 when the run
lock is still held (the backend of a killed run not gone yet). It builds the run from the
adapters and the helper's recipe alone (no infra.wiring: a child that imports less starts
sooner, and the test starts several).
Run: `python -m tests.integration.invoice_run_child DATABASE_URL SCHEMA PERIOD`."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from functools import partial

import adapters.invoice_run as invoice_run
from adapters.ledger import LedgerStore
from adapters.period_numbering import PeriodNumbering
from adapters.pg import open_pool
from domain.errors import Conflict
from domain.services.invoicing import InvoicingService
from infra.invoice_run_helper import helper_invoice_run
from infra.settings import from_env

BUSY_EXIT = 3
HELPERS = 1
GRACE = timedelta(hours=24)
SUPPLIER_STATE_CODE = "29"


def main(database_url: str, schema: str, period: str) -> int:
    clock = lambda: datetime.now(UTC)  # noqa: E731
    ledger = LedgerStore(database_url, schema)
    pool = open_pool(database_url, schema)
    try:
        settings = from_env({"BILLING_PG_SCHEMA": schema, "SUPPLIER_STATE_CODE": SUPPLIER_STATE_CODE,
                             "BILLING_GRACE_HOURS": str(int(GRACE.total_seconds() // 3600))})
        invoicing = InvoicingService(ledger, clock)
        runner = invoice_run.InvoiceRun(
            pool, ledger, invoicing, SUPPLIER_STATE_CODE, clock, GRACE,
            schema, helpers=HELPERS, helper_recipe=partial(helper_invoice_run, settings,
                                                           database_url))
        try:
            runner.run(period, lambda done, _total: print(f"drafted {done}", flush=True),
                       actor=None)
        except Conflict:
            return BUSY_EXIT
        PeriodNumbering(pool, ledger, invoicing).finalize_period(
            period, lambda n: print(f"finalized {n}", flush=True), actor=None)
        print("done", flush=True)
        return 0
    finally:
        pool.close()
        ledger.close()


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
