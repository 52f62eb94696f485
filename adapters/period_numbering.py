"""Finalize-and-number a period's drafts in batches (billing day's second step, after the
invoice run of adapters/invoice_run.py): FINALIZE_BATCH_INVOICES drafts per ledger append
with the financial year's InvoiceSequence (InvoicingService.finalize_batch), so numbers stay
gapless however the batches race single finalizations; the next page is read while the
current one is appended. Killed at any point and run again, it numbers the rest."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

from psycopg_pool import ConnectionPool

from adapters.gc_pace import fewer_collections
from adapters.ledger import LedgerStore
from domain.audit import Actor
from domain.invoice import FIRST_REVISION, VOID, Invoice, invoice_id
from domain.numbering import InvoiceSequence
from domain.period import parse_period
from domain.services.invoicing import REVISIONS_MAX, InvoicingService
from projections import plans

FINALIZE_BATCH_INVOICES = 500  # drafts numbered per ledger append, with their sequence


class PeriodNumbering:
    def __init__(self, pool: ConnectionPool, ledger: LedgerStore,
                 invoicing: InvoicingService) -> None:
        self._pool = pool
        self._ledger = ledger
        self._invoicing = invoicing

    def finalize_period(self, period: str, progress: Callable[[int], None] | None = None, *,
                        actor: Actor | None) -> int:
        """Finalize (number) every draft of `period`, FINALIZE_BATCH_INVOICES per ledger append
        with the financial year's sequence (InvoicingService.finalize_batch): the drafts are
        found by their derived ids from the subscribed organisations, in the ledger itself (no
        read model to wait for). Returns how many were finalized; `progress` is told the count
        after each batch. Interrupted and run again, it numbers the rest: a batch is numbered
        whole or not at all."""
        parse_period(period)
        finalized = 0
        sequences: dict[int, InvoiceSequence] = {}  # the year's sequence, kept across batches
        # The next page is read (a thread of its own) while this one is numbered and appended:
        # its invoices are other organisations', and a batch read too early only loses its
        # append's race on their versions, and is then read again (finalize_batch).
        with fewer_collections(), ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="invoice-finalize-read") as reader:
            reading = reader.submit(self._finalize_page, period, None)
            while True:
                page, newest = reading.result()
                if not page:
                    return finalized
                reading = reader.submit(self._finalize_page, period, page[-1])
                finalized += len(self._invoicing.finalize_batch(
                    list(newest), actor=actor, loaded=newest, sequences=sequences))
                if progress:
                    progress(finalized)

    def _finalize_page(self, period: str, after: UUID | None
                       ) -> tuple[list[UUID], dict[UUID, Invoice]]:
        """The next FINALIZE_BATCH_INVOICES subscribed organisations after `after`, and their
        newest invoices of `period`."""
        with self._pool.connection() as conn:
            page = plans.subscribed_page(conn, after, FINALIZE_BATCH_INVOICES)
        return page, self._newest_invoices(period, page) if page else {}

    def _newest_invoices(self, period: str, org_ids: list[UUID]) -> dict[UUID, Invoice]:
        """The newest revision of each organisation's invoice for `period` (those that have
        one), by id: revision n + 1 exists only once revision n is void."""
        out: dict[UUID, Invoice] = {}
        wanted = {invoice_id(o, period, FIRST_REVISION): (o, FIRST_REVISION) for o in org_ids}
        while wanted:
            found = self._ledger.get_many(wanted, Invoice)
            following: dict[UUID, tuple[UUID, int]] = {}
            for ident, (org_id, revision) in wanted.items():
                invoice = found.get(ident)
                if invoice is None:
                    continue
                if invoice.status == VOID and revision < REVISIONS_MAX:
                    following[invoice_id(org_id, period, revision + 1)] = (org_id, revision + 1)
                else:
                    out[ident] = invoice
            wanted = following
        return out
