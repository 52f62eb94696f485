"""Organisations: create one, change its settings, suspend or resume it."""

from __future__ import annotations

from uuid import UUID

from domain.audit import Actor
from domain.organisation import Organisation, OrganisationSettings
from domain.ports import Clock, Ledger, NewId
from domain.services.base import Written


class OrganisationService:
    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id

    def create(self, settings: OrganisationSettings, *, actor: Actor | None) -> Written[Organisation]:
        org = Organisation.create(self._new_id(), settings, self._clock())
        return Written(org, self._ledger.save(org, actor=actor))

    def update_settings(
        self, org_id: UUID, changes: OrganisationSettings, *, suspended: bool | None = None, reason: str = "",
        actor: Actor | None,
    ) -> Written[Organisation]:
        org = self._ledger.get(org_id, Organisation)
        now = self._clock()
        changed = org.update_settings(changes, now) if changes else False
        if suspended is not None:
            changed = org.set_suspended(suspended, reason, now) or changed
        return Written(org, self._ledger.save(org, actor=actor) if changed else 0)
