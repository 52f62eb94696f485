"""Ports: the small interfaces that adapters implement for the domain's services."""

from __future__ import annotations

from typing import Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

A = TypeVar("A", bound=Aggregate)


class Ledger(Protocol):
    """The append-only event store, seen from an application service."""

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        """Return the aggregate, or raise NotFound."""
        ...

    def save(self, *aggregates: Aggregate) -> int:
        """Append pending events atomically; return the ledger position of the last one.

        Raises Conflict when an aggregate id or version already exists, Unavailable when
        the ledger cannot commit.
        """
        ...


class ProjectionGate(Protocol):
    """Lets a reader wait until a read model includes a ledger position."""

    def wait_for(self, projection: str, position: int, timeout_s: float) -> None:
        """Return once `projection` has applied `position`; raise Unavailable at the deadline."""
        ...

    def wait_until_current(self, projection: str, min_position: int, timeout_s: float) -> None:
        """Wait until `projection` includes every entry committed before this call."""
        ...
