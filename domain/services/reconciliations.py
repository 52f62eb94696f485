"""Reconciliations: record a finished report in the ledger (get -> decide -> save).

The report is made by a replay (adapters/reconciliation.py); recording it appends
`Reconciliation.Completed` with the report's SHA-256, so the ledger itself keeps the proof of
what was checked, up to which position, and with which verdict."""

from __future__ import annotations

from domain.audit import Actor
from domain.ports import Ledger
from domain.reconciliation import Reconciliation, Report
from domain.services.base import Written


class ReconciliationService:
    """Records completed reconciliations."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def record(self, report: Report, *, actor: Actor | None) -> Written[Reconciliation]:
        reconciliation = Reconciliation.complete(report)
        return Written(reconciliation, self._ledger.save(reconciliation, actor=actor))
