"""Whom the dead letters of some read models block, for the invoice run: each dead-lettered
ledger entry is read and decoded, and its scope decided (domain/services/invoice_runs.py
scope_of: one organisation, a plan's subscribers, or everyone); an entry that names nobody is
attributed to the owner of its aggregate, read from the ledger; one that cannot be read or
decoded, to everyone."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from psycopg_pool import ConnectionPool

from adapters.bookkeeping import dead_letter_pages
from adapters.ledger import LedgerStore
from domain.errors import DomainError
from domain.services import invoice_runs as decide
from domain.services.invoice_runs import DeadLettered, OwnerOf, Scope

log = logging.getLogger("billing.invoice_run")

ENTRIES_PER_READ = 1000  # dead-lettered ledger entries decoded per read


def blocked_by(pool: ConnectionPool, ledger: LedgerStore, models: Sequence[str],
               usage_periods: list[str]) -> DeadLettered:
    """What every dead letter of `models` blocks (all of them, page by page)."""
    entries: list[tuple[str, int, Scope]] = []
    with pool.connection() as conn:
        for page in dead_letter_pages(conn, models):
            events = _entries(ledger, sorted({int(row["position"]) for row in page}))
            for row in page:
                position = int(row["position"])
                event = events.get(position)
                scope = (decide.EVERYONE if event is None
                         else _scope(ledger, event, usage_periods))
                entries.append((str(row["name"]), position, scope))
    return decide.dead_lettered(entries)


def _scope(ledger: LedgerStore, event: Any, usage_periods: list[str]) -> Scope:
    """Whom a dead-lettered entry can affect, reading its aggregate when it names nobody."""
    scope = decide.scope_of(event, usage_periods)
    if not isinstance(scope, OwnerOf):
        return scope
    try:
        owner = ledger.get(scope.aggregate_id, scope.kind)
    except DomainError:
        return decide.scope_of_owner(None)
    return decide.scope_of_owner(owner)


def _entries(ledger: LedgerStore, positions: list[int]) -> dict[int, Any]:
    """The decoded ledger entries at `positions` (sorted): one read per run of consecutive
    positions. A position that cannot be read or decoded is absent."""
    out: dict[int, Any] = {}
    index = 0
    while index < len(positions):
        first = last = positions[index]
        while (index + 1 < len(positions) and positions[index + 1] == last + 1
               and last - first + 1 < ENTRIES_PER_READ):
            index += 1
            last = positions[index]
        index += 1
        for n in ledger.read_after(first - 1, last - first + 1, stop=last):
            try:
                out[int(n.id)] = ledger.decode(n)
            except Exception:  # an entry that will not decode is attributed to everyone
                log.exception("dead letter at %s cannot be decoded", n.id)
    return out
