"""In-memory stand-ins for unit tests of domain services: a Ledger with the real version-
conflict rule (an atomic save) and a settable clock. Integration tests use the real ledger."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.audit import Actor
from domain.errors import Conflict, NotFound

A = TypeVar("A", bound=Aggregate)


class MemoryLedger:
    """domain.ports.Ledger in memory: an atomic save with the version-conflict rule."""

    def __init__(self) -> None:
        self.events: dict[UUID, list[Any]] = {}
        self.position = 0
        self.before_save: Callable[[], object] | None = None
        self.always_conflict = False

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        aggregate: Any = None
        for event in self.events.get(aggregate_id, []):
            aggregate = event.mutate(aggregate)
        if not isinstance(aggregate, kind):
            raise NotFound(kind.__name__, aggregate_id)
        return aggregate

    def save(self, *aggregates: Aggregate, actor: Actor | None = None) -> int:
        # No audit entries in memory: `actor` is accepted, as the port asks, and not recorded.
        if self.before_save is not None:
            hook, self.before_save = self.before_save, None
            hook()
        pending = [e for a in aggregates for e in a.collect_events()]
        if self.always_conflict:
            raise Conflict("already recorded in the ledger")
        lengths = {k: len(v) for k, v in self.events.items()}
        for event in pending:  # check everything first: all or nothing
            expected = lengths.get(event.originator_id, 0) + 1
            if event.originator_version != expected:
                raise Conflict("already recorded in the ledger")
            lengths[event.originator_id] = expected
        for event in pending:
            self.events.setdefault(event.originator_id, []).append(event)
            self.position += 1
        return self.position


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
