"""LedgerStore (adapters/ledger.py) on Postgres held to the Ledger contract (tests/contract).

Each test gets a ledger in a schema of its own on the session's embedded Postgres, dropped
afterwards: a schema and one table, a few milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from adapters.ledger import LedgerStore
from domain.ports import Ledger
from tests.contract.ledger import LedgerContract


class TestLedgerStore(LedgerContract):
    PROPERTY_EXAMPLES: ClassVar[int] = 15  # each example is a few round trips to Postgres

    @contextmanager
    def open_ledger(self, request: pytest.FixtureRequest) -> Iterator[Ledger]:
        database_url, _ = request.getfixturevalue("server_urls")
        name = f"ledger_{uuid4().hex[:10]}"
        schema = sql.Identifier(name)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        store = LedgerStore(database_url, name)
        try:
            yield store
        finally:
            store.close()
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
