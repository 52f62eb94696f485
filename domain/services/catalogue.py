"""The catalogue: meters (platform-wide) and projects (an organisation's)."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from domain.audit import Actor
from domain.errors import NotFound
from domain.meter import Meter, meter_id
from domain.organisation import Organisation
from domain.ports import Clock, Ledger, NewId
from domain.project import Project
from domain.services.base import Written


class CatalogueService:
    """Meters and projects."""

    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id

    def define_meter(
        self, *, code: str, name: str, aggregation: str, field: str | None, group_by: list[str],
        allow_negative: bool, has_usage: Callable[[str], bool], actor: Actor | None,
    ) -> tuple[Written[Meter], bool]:
        """Define a meter, or change an existing one; returns (written, created)."""
        try:
            meter = self._ledger.get(meter_id(code), Meter)
        except NotFound:
            meter = Meter.define(code, name, aggregation, field, group_by, allow_negative,
                                 self._clock())
            return Written(meter, self._ledger.save(meter, actor=actor)), True
        changed = meter.redefine(name, aggregation, field, group_by, allow_negative,
                                 has_usage(code), self._clock())
        return Written(meter, self._ledger.save(meter, actor=actor) if changed else 0), False

    def create_project(
        self, organisation_id: UUID, name: str, *, actor: Actor | None
    ) -> Written[Project]:
        self._ledger.get(organisation_id, Organisation)  # NotFound for an unknown organisation
        project = Project.create(self._new_id(), organisation_id, name, self._clock())
        return Written(project, self._ledger.save(project, actor=actor))
