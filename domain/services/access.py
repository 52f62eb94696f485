"""Access: project API keys (issue, rotate, revoke) and admin tokens (issue, revoke, the
bootstrap owner). A new secret is returned once and never stored; only its hash is."""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import UUID

from domain.access import (
    TOKEN_PREFIX,
    TOKEN_PREFIX_CHARS,
    AdminToken,
    bootstrap_token_id,
    token_hash,
)
from domain.api_key import KEY_PREFIX, ApiKey
from domain.audit import Actor
from domain.errors import Conflict, NotFound
from domain.organisation import Organisation
from domain.ports import Clock, Ledger, NewId, NewSecret
from domain.project import Project
from domain.services.base import Written


class AccessService:
    """API keys and admin tokens."""

    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId, new_secret: NewSecret) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id
        self._new_secret = new_secret

    # ---- API keys --------------------------------------------------------------------------

    def issue_key(
        self, project_id: UUID, name: str, expires_at: datetime | None, *, allowed_ips: str = "",
        actor: Actor | None,
    ) -> tuple[Written[ApiKey], str]:
        """Returns the key as saved and the full secret, which is shown once and never stored."""
        project = self._ledger.get(project_id, Project)
        key, full = self._new_key(project, name, expires_at, allowed_ips)
        return Written(key, self._ledger.save(key, actor=actor)), full

    def _new_key(self, project: Project, name: str, expires_at: datetime | None,
                 allowed_ips: str) -> tuple[ApiKey, str]:
        prefix, secret = self._new_secret()
        full = f"{KEY_PREFIX}{prefix}_{secret}"
        key = ApiKey.issue(key_id=self._new_id(), project_id=project.id,
                           organisation_id=project.organisation_id, name=name, prefix=prefix,
                           secret=full, expires_at=expires_at, at=self._clock(),
                           allowed_ips=allowed_ips)
        return key, full

    def rotate_key(
        self, key_id: UUID, overlap: timedelta, *, actor: Actor | None
    ) -> tuple[Written[ApiKey], str]:
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
        return Written(new, self._ledger.save(new, old, actor=actor)), full

    def revoke_key(self, key_id: UUID, *, actor: Actor | None) -> Written[ApiKey]:
        key = self._ledger.get(key_id, ApiKey)
        key.revoke(self._clock())
        return Written(key, self._ledger.save(key, actor=actor))

    # ---- admin tokens ----------------------------------------------------------------------

    def issue_token(
        self, *, role: str, organisation_id: UUID | None, name: str, expires_at: datetime | None,
        actor: Actor | None,
    ) -> tuple[Written[AdminToken], str]:
        if organisation_id is not None:
            self._ledger.get(organisation_id, Organisation)  # NotFound for an unknown organisation
        prefix, secret = self._new_secret()
        token = f"{TOKEN_PREFIX}{prefix}_{secret}"
        issued = AdminToken.issue(token_id=self._new_id(), role=role,
                                  organisation_id=organisation_id, name=name, prefix=prefix,
                                  token=token, expires_at=expires_at, at=self._clock())
        return Written(issued, self._ledger.save(issued, actor=actor)), token

    def revoke_token(self, token_id: UUID, *, actor: Actor | None) -> Written[AdminToken]:
        token = self._ledger.get(token_id, AdminToken)
        token.revoke(self._clock())
        return Written(token, self._ledger.save(token, actor=actor))

    def ensure_bootstrap_owner(self, token: str) -> int:
        """Record the BILLING_ADMIN_TOKEN owner once; starting again with it changes nothing."""
        ident = bootstrap_token_id(token)
        try:
            self._ledger.get(ident, AdminToken)
            return 0
        except NotFound:
            pass
        prefix = token_hash(token)[:TOKEN_PREFIX_CHARS]
        owner = AdminToken.issue(token_id=ident, role="owner", organisation_id=None,
                                 name="bootstrap owner (BILLING_ADMIN_TOKEN)", prefix=prefix,
                                 token=token, expires_at=None, at=self._clock())
        try:
            return self._ledger.save(owner, actor=None)  # recorded at start-up, by nobody
        except Conflict:
            return 0  # another process recorded it first
