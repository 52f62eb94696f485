"""Billing day in a process of its own, for tests that SIGKILL it (test_invoice_run_kill.py):
the invoice run of a period, then finalize-and-number of its drafts, each printing a progress
line after every batch ("drafted <n>", "finalized <n>") and "done" at the end. Small batches,
so that a kill can land in many places. Exit 0 when done, 3 when the run lock is still held
(the backend of a killed run not gone yet). Settings from the environment (DATABASE_URL,
BILLING_PG_SCHEMA, BILLING_DATA_DIR). Run: `python -m tests.integration.invoice_run_child P`."""

from __future__ import annotations

import sys

import adapters.invoice_run as invoice_run
from domain.errors import Conflict
from infra.settings import from_env
from infra.wiring import Runtime

BUSY_EXIT = 3
ORGS_PER_BATCH = 50
DRAFTS_PER_APPEND = 20
FINALIZE_BATCH_INVOICES = 30


def main(period: str) -> int:
    invoice_run.ORGS_PER_BATCH = ORGS_PER_BATCH
    invoice_run.DRAFTS_PER_APPEND = DRAFTS_PER_APPEND
    invoice_run.FINALIZE_BATCH_INVOICES = FINALIZE_BATCH_INVOICES
    settings = from_env()
    assert settings.database_url
    rt = Runtime.open(settings, settings.database_url, "")
    try:
        runner = rt.invoice_run()
        try:
            runner.run(period, lambda done, _total: print(f"drafted {done}", flush=True),
                       actor=None)
        except Conflict:
            return BUSY_EXIT
        runner.finalize_period(period, lambda n: print(f"finalized {n}", flush=True), actor=None)
        print("done", flush=True)
        return 0
    finally:
        rt.pool.close()
        rt.ledger.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
