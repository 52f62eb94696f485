"""In-memory stand-ins for unit tests of domain services: a Ledger held to the same contract as
LedgerStore (tests/contract/ledger.py) and a settable clock. Integration tests use the real ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent

from adapters.codec import MsgspecMapper
from domain.audit import Actor
from domain.errors import Conflict, NotFound

A = TypeVar("A", bound=Aggregate)


class MemoryLedger:
    """domain.ports.Ledger in memory: an atomic save with the version-conflict rule.

    Events are kept encoded by the ledger's own codec and decoded afresh on every read, as
    LedgerStore does: what a service gets back has the types the real ledger gives (datetimes
    in UTC, say), and shares no object with what it saved or with an earlier read.
    """

    def __init__(self) -> None:
        self._mapper = MsgspecMapper()
        self._stored: dict[UUID, list[StoredEvent]] = {}
        self.position = 0
        self.before_save: Callable[[], object] | None = None
        self.always_conflict = False

    @property
    def events(self) -> dict[UUID, list[Any]]:
        """Every aggregate's events, oldest first, as the ledger gives them back."""
        return {ident: [self._mapper.to_domain_event(s) for s in stored]
                for ident, stored in self._stored.items()}

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        aggregate: Any = None
        for stored in self._stored.get(aggregate_id, []):
            aggregate = self._mapper.to_domain_event(stored).mutate(aggregate)
        if not isinstance(aggregate, kind):
            raise NotFound(kind.__name__, aggregate_id)
        return aggregate

    def save(self, *aggregates: Aggregate, actor: Actor | None = None) -> int:
        """Append every pending event or none; the position of the last one, or the head
        when nothing is pending (as LedgerStore). No audit entries in memory: `actor` is
        accepted, as the port asks, and not recorded."""
        if self.before_save is not None:
            hook, self.before_save = self.before_save, None
            hook()
        pending = [e for a in aggregates for e in a.pending_events]  # drained once appended
        if self.always_conflict:
            raise Conflict("already recorded in the ledger")
        lengths = {k: len(v) for k, v in self._stored.items()}
        for event in pending:  # check everything first: all or nothing
            expected = lengths.get(event.originator_id, 0) + 1
            if event.originator_version != expected:
                raise Conflict("already recorded in the ledger")
            lengths[event.originator_id] = expected
        encoded = [(e.originator_id, self._mapper.to_stored_event(e)) for e in pending]
        for ident, stored in encoded:
            self._stored.setdefault(ident, []).append(stored)
            self.position += 1
        for aggregate in aggregates:
            aggregate.collect_events()
        return self.position


    def get_many(self, aggregate_ids: Iterable[UUID], kind: type[A]) -> dict[UUID, A]:
        out: dict[UUID, A] = {}
        for ident in aggregate_ids:
            try:
                out[ident] = self.get(ident, kind)
            except NotFound:
                continue
        return out

    def save_batch(self, groups: Sequence[Sequence[Aggregate]], *, actor: Actor | None) -> int:
        return self.save(*(a for group in groups for a in group), actor=actor)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
