"""Application services: get -> decide -> save, with clock and ids passed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.access import (
    TOKEN_PREFIX,
    TOKEN_PREFIX_CHARS,
    AdminToken,
    bootstrap_token_id,
    token_hash,
)
from domain.api_key import KEY_PREFIX, ApiKey
from domain.errors import Conflict, NotFound
from domain.meter import Meter, meter_id
from domain.organisation import Organisation, OrganisationSettings
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

    def create(self, settings: OrganisationSettings) -> Written[Organisation]:
        org = Organisation.create(self._new_id(), settings, self._clock())
        return Written(org, self._ledger.save(org))

    def update_settings(
        self, org_id: UUID, changes: OrganisationSettings, suspended: bool | None = None,
        reason: str = ""
    ) -> Written[Organisation]:
        org = self._ledger.get(org_id, Organisation)
        now = self._clock()
        changed = org.update_settings(changes, now) if changes else False
        if suspended is not None:
            changed = org.set_suspended(suspended, reason, now) or changed
        return Written(org, self._ledger.save(org) if changed else 0)


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
        self, project_id: UUID, name: str, expires_at: datetime | None, allowed_ips: str = ""
    ) -> tuple[Written[ApiKey], str]:
        """Returns the key as saved and the full secret, which is shown once and never stored."""
        project = self._ledger.get(project_id, Project)
        key, full = self._new_key(project, name, expires_at, allowed_ips)
        return Written(key, self._ledger.save(key)), full

    def _new_key(self, project: Project, name: str, expires_at: datetime | None,
                 allowed_ips: str) -> tuple[ApiKey, str]:
        prefix, secret = self._new_secret()
        full = f"{KEY_PREFIX}{prefix}_{secret}"
        key = ApiKey.issue(self._new_id(), project.id, project.organisation_id, name, prefix, full,
                           expires_at, self._clock(), allowed_ips)
        return key, full

    def rotate_key(self, key_id: UUID, overlap: timedelta) -> tuple[Written[ApiKey], str]:
        """A new key for the same project; the old one keeps working for `overlap`, then expires.
        Both changes are saved in one ledger transaction. The new key expires when the old one
        would have (a rotation renews the secret, not the lifetime); an expired key is not
        rotated (Conflict): it would otherwise turn into a key that never expires."""
        old = self._ledger.get(key_id, ApiKey)
        if old.expires_at is not None and old.expires_at <= self._clock():
            raise Conflict("the key has expired; issue a new key instead of rotating it")
        project = self._ledger.get(old.project_id, Project)
        new, full = self._new_key(project, old.name, old.expires_at, old.allowed_ips)
        old.expire_by(self._clock() + overlap, self._clock())
        return Written(new, self._ledger.save(new, old)), full

    def revoke_key(self, key_id: UUID) -> Written[ApiKey]:
        key = self._ledger.get(key_id, ApiKey)
        key.revoke(self._clock())
        return Written(key, self._ledger.save(key))


class AccessService:
    """Admin tokens: issue (the token is shown once), revoke, and the bootstrap owner."""

    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId, new_secret: NewSecret) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id
        self._new_secret = new_secret

    def issue_token(
        self, role: str, organisation_id: UUID | None, name: str, expires_at: datetime | None
    ) -> tuple[Written[AdminToken], str]:
        if organisation_id is not None:
            self._ledger.get(organisation_id, Organisation)  # NotFound for an unknown organisation
        prefix, secret = self._new_secret()
        token = f"{TOKEN_PREFIX}{prefix}_{secret}"
        issued = AdminToken.issue(self._new_id(), role, organisation_id, name, prefix, token,
                                  expires_at, self._clock())
        return Written(issued, self._ledger.save(issued)), token

    def revoke_token(self, token_id: UUID) -> Written[AdminToken]:
        token = self._ledger.get(token_id, AdminToken)
        token.revoke(self._clock())
        return Written(token, self._ledger.save(token))

    def ensure_bootstrap_owner(self, token: str) -> int:
        """Record the BILLING_ADMIN_TOKEN owner once; starting again with it changes nothing."""
        ident = bootstrap_token_id(token)
        try:
            self._ledger.get(ident, AdminToken)
            return 0
        except NotFound:
            pass
        prefix = token_hash(token)[:TOKEN_PREFIX_CHARS]
        owner = AdminToken.issue(ident, "owner", None, "bootstrap owner (BILLING_ADMIN_TOKEN)",
                                 prefix, token, None, self._clock())
        try:
            return self._ledger.save(owner)
        except Conflict:
            return 0  # another process recorded it first
