"""Application services: get -> decide -> save, with clock and ids passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.api_key import KEY_PREFIX, ApiKey
from domain.errors import NotFound
from domain.meter import Meter, meter_id
from domain.organisation import Organisation, Settings
from domain.ports import Ledger
from domain.project import Project

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


NewSecret = Callable[[], tuple[str, str]]  # (visible prefix, secret part)


class CatalogueService:
    """Meters, projects and API keys."""

    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId, new_secret: NewSecret) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id
        self._new_secret = new_secret

    def define_meter(
        self, code: str, name: str, aggregation: str, field: str | None, group_by: list[str],
        allow_negative: bool, has_usage: Callable[[str], bool],
    ) -> tuple[Written[Meter], bool]:
        """Define a meter, or change an existing one; returns (written, created)."""
        try:
            meter = self._ledger.get(meter_id(code), Meter)
        except NotFound:
            meter = Meter.define(code, name, aggregation, field, group_by, allow_negative,
                                 self._clock())
            return Written(meter, self._ledger.save(meter)), True
        changed = meter.redefine(name, aggregation, field, group_by, allow_negative,
                                 has_usage(code), self._clock())
        return Written(meter, self._ledger.save(meter) if changed else 0), False

    def create_project(self, organisation_id: UUID, name: str) -> Written[Project]:
        self._ledger.get(organisation_id, Organisation)  # NotFound for an unknown organisation
        project = Project.create(self._new_id(), organisation_id, name, self._clock())
        return Written(project, self._ledger.save(project))

    def issue_key(
        self, project_id: UUID, name: str, expires_at: datetime | None
    ) -> tuple[Written[ApiKey], str]:
        """Returns the key as saved and the full secret, which is shown once and never stored."""
        project = self._ledger.get(project_id, Project)
        prefix, secret = self._new_secret()
        full = f"{KEY_PREFIX}{prefix}_{secret}"
        key = ApiKey.issue(self._new_id(), project.id, project.organisation_id, name, prefix, full,
                           expires_at, self._clock())
        return Written(key, self._ledger.save(key)), full

    def revoke_key(self, key_id: UUID) -> Written[ApiKey]:
        key = self._ledger.get(key_id, ApiKey)
        key.revoke(self._clock())
        return Written(key, self._ledger.save(key))
