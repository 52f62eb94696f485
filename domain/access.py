"""Admin principals: roles, admin tokens (only their hashes are recorded) and the Principal a
request acts as."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, Problems
from domain.instants import check_instant

GLOBAL_ROLES = ("owner", "billing_admin", "support", "auditor")
ORG_ROLES = ("org_admin", "org_viewer")
PRINCIPAL_ROLES = GLOBAL_ROLES + ORG_ROLES
TOKEN_PREFIX = "bt_"
TOKEN_PREFIX_CHARS = 12
NAME_MAX_CHARS = 200
_BOOTSTRAP_NAMESPACE = UUID("2d5a4f0e-8d9b-4c1e-a9a8-5b7f3f1d0b01")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bootstrap_token_id(token: str) -> UUID:
    """The bootstrap owner's id follows from its token: re-starting with it changes nothing."""
    return uuid5(_BOOTSTRAP_NAMESPACE, token_hash(token))


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    id: UUID
    role: str
    organisation_id: UUID | None  # set for organisation-scoped roles only
    allowed_ips: str = ""  # its organisation's allow-list ("" = any address), scoped roles only

    @property
    def scoped(self) -> bool:
        return self.organisation_id is not None


class AdminToken(Aggregate):
    class Issued(Aggregate.Created):
        role: str
        organisation_id: UUID | None
        name: str
        prefix: str
        token_sha256: str
        expires_at: datetime | None

    class Revoked(Aggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.revoked = True

    def __init__(self, role: str, organisation_id: UUID | None, name: str, prefix: str,
                 token_sha256: str, expires_at: datetime | None) -> None:
        self.role = role
        self.organisation_id = organisation_id
        self.name = name
        self.prefix = prefix
        self.token_sha256 = token_sha256
        self.expires_at = expires_at
        self.revoked = False

    @classmethod
    def issue(cls, *, token_id: UUID, role: str, organisation_id: UUID | None, name: str,
              prefix: str, token: str, expires_at: datetime | None, at: datetime) -> AdminToken:
        problems = Problems()
        if role not in PRINCIPAL_ROLES:
            problems.add("role", f"must be one of {', '.join(PRINCIPAL_ROLES)}")
        elif role in ORG_ROLES and organisation_id is None:
            problems.add("organisation_id", f"{role} needs the organisation it may see")
        elif role in GLOBAL_ROLES and organisation_id is not None:
            problems.add("organisation_id", f"{role} is not scoped to an organisation")
        if not name.strip() or len(name) > NAME_MAX_CHARS:
            problems.add("name", f"1-{NAME_MAX_CHARS} characters")
        check_instant(expires_at, "expires_at")
        if expires_at is not None and expires_at <= at:
            problems.add("expires_at", "must be a future time with an offset")
        problems.raise_if_any()
        return cls._create(cls.Issued, id=token_id, timestamp=at, role=role,
                           organisation_id=organisation_id, name=name, prefix=prefix,
                           token_sha256=token_hash(token), expires_at=expires_at)

    def revoke(self, at: datetime) -> None:
        if self.revoked:
            raise Conflict("the token is already revoked")
        self.trigger_event(self.Revoked, timestamp=at)
