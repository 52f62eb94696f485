"""Shared steps for the invoice-run tests: a runtime with the relay and projectors running and
a usage writer, waiting for every read model, and one invoice run at a chosen instant."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

from adapters.invoice_run import InvoiceRun
from domain.records import RunResult
from domain.services.invoicing import InvoicingService
from infra.wiring import READ_MODELS, Runtime
from tests.conftest import ThreadedWriter, background_roles, reached, threaded_writer, wait_sync

GRACE = timedelta(hours=24)
SUPPLIER_STATE_CODE = "29"


@contextlib.contextmanager
def live_runtime(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with threaded_writer(runtime) as writer, background_roles(runtime, {"relay", "project"}):
        yield runtime, writer


def now() -> datetime:
    return datetime.now(UTC)


def caught_up(rt: Runtime, position: int | None = None) -> None:
    """Wait until every read model has applied the ledger up to `position` (default: head)."""
    target = rt.ledger.head() if position is None else position
    for model in READ_MODELS:
        wait_sync(partial(reached, rt, model.name, target), f"{model.name} caught up")


def run_invoices(rt: Runtime, period: str, at: datetime) -> RunResult:
    """One invoice run of `period` with the clock at `at`; returns once its drafts are projected."""
    clock = lambda: at  # noqa: E731
    result = InvoiceRun(rt.pool, rt.ledger, InvoicingService(rt.ledger, clock), SUPPLIER_STATE_CODE,
                        clock, GRACE, rt.settings.pg_schema).run(period, actor=None)
    caught_up(rt)
    return result
