"""What an invoice run helper process builds its run from (adapters/invoice_run_helpers.py):
the run as Runtime.invoice_run builds it, over the helper's own ledger and connections. A
module of its own, importing only what a run needs, because every helper imports it when it
starts (infra/wiring.py imports the whole service: a second more before the first batch)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from adapters.invoice_run import InvoiceRun
from adapters.ledger import LedgerStore
from adapters.pg import open_pool
from domain.services.invoicing import InvoicingService
from infra.settings import Settings

HELPER_POOL_MAX_SIZE = 2  # a helper reads with one connection at a time


def _now() -> datetime:
    return datetime.now(UTC)


@contextlib.contextmanager
def helper_invoice_run(settings: Settings, database_url: str) -> Iterator[InvoiceRun]:
    """The helper's run (its connections closed after). It only drafts the batches it is
    handed (never numbers invoices), so its invoicing needs no pause between retries."""
    ledger = LedgerStore(database_url, settings.pg_schema)
    pool = open_pool(database_url, settings.pg_schema, max_size=HELPER_POOL_MAX_SIZE)
    try:
        yield InvoiceRun(pool, ledger, InvoicingService(ledger, _now),
                         settings.supplier_state_code, _now,
                         timedelta(hours=settings.grace_hours), settings.pg_schema)
    finally:
        pool.close()
        ledger.close()
