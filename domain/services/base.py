"""What every application service shares: `Written`, what a command wrote, and the bounded
retry of a command that lost a race on the same aggregate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from eventsourcing.domain import Aggregate

from domain.errors import Conflict

SAVE_ATTEMPTS = 3  # decide again after losing a race on the same aggregate, at most this often

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")


@dataclass(frozen=True)
class Written(Generic[A]):
    """What a command did: the aggregate as saved and the ledger position a reader can wait
    for (0 when nothing was appended)."""

    aggregate: A
    position: int


def with_retries(attempt: Callable[[], T]) -> T:
    """Run `attempt` (get -> decide -> save); after a Conflict, decide again from the fresh
    state, SAVE_ATTEMPTS times in all."""
    for _ in range(SAVE_ATTEMPTS - 1):
        try:
            return attempt()
        except Conflict:
            continue
    return attempt()
