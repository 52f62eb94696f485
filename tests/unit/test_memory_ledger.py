"""The in-memory ledger (tests/unit/memory.py) held to the Ledger contract (tests/contract)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from domain.ports import Ledger
from tests.contract.ledger import LedgerContract
from tests.unit.memory import MemoryLedger


class TestMemoryLedger(LedgerContract):
    @contextmanager
    def open_ledger(self, request: pytest.FixtureRequest) -> Iterator[Ledger]:
        yield MemoryLedger()
