"""Application services: get -> decide -> save, with clock and ids passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.organisation import Organisation, Settings
from domain.ports import Ledger

Clock = Callable[[], datetime]
NewId = Callable[[], UUID]
A = TypeVar("A", bound=Aggregate)


@dataclass(frozen=True)
class Written(Generic[A]):
    """What a command did: the aggregate as saved and the ledger position a reader can wait
    for (0 when nothing was appended)."""

    aggregate: A
    position: int


class OrganisationService:
    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id

    def create(self, settings: Settings) -> Written[Organisation]:
        org = Organisation.create(self._new_id(), settings, self._clock())
        return Written(org, self._ledger.save(org))

    def update_settings(self, org_id: UUID, changes: Settings) -> Written[Organisation]:
        org = self._ledger.get(org_id, Organisation)
        if not org.update_settings(changes, self._clock()):
            return Written(org, 0)
        return Written(org, self._ledger.save(org))
