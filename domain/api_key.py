"""The ApiKey aggregate: a project's credential. Only a hash of the secret is ever recorded."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, Problems
from domain.instants import check_instant

NAME_MAX_CHARS = 200
KEY_PREFIX = "bk_"
PREFIX_CHARS = 12  # visible part: identifies a key in lists and logs


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """`bk_<prefix>_<secret>` -> (prefix, full key) or None when it is not shaped like a key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    rest = key[len(KEY_PREFIX):]
    prefix, sep, secret = rest.partition("_")
    if not sep or len(prefix) != PREFIX_CHARS or not secret:
        return None
    return prefix, key


class ApiKey(Aggregate):
    class Created(Aggregate.Created):
        project_id: UUID
        organisation_id: UUID
        name: str
        prefix: str
        secret_sha256: str
        expires_at: datetime | None
        allowed_ips: str = ""  # canonical comma-separated CIDRs; "" = any address

    class ExpiryBrought(Aggregate.Event):
        """The key now expires earlier (rotation: the old key overlaps the new one briefly)."""

        expires_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.expires_at = self.expires_at

    class Revoked(Aggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.revoked = True

    def __init__(self, project_id: UUID, organisation_id: UUID, name: str, prefix: str,
                 secret_sha256: str, expires_at: datetime | None, allowed_ips: str = "") -> None:
        self.project_id = project_id
        self.organisation_id = organisation_id
        self.name = name
        self.prefix = prefix
        self.secret_sha256 = secret_sha256
        self.expires_at = expires_at
        self.allowed_ips = allowed_ips
        self.revoked = False

    @classmethod
    def issue(cls, *, key_id: UUID, project_id: UUID, organisation_id: UUID, name: str, prefix: str,
              secret: str, expires_at: datetime | None, at: datetime, allowed_ips: str = "") -> ApiKey:
        problems = Problems()
        if not name.strip() or len(name) > NAME_MAX_CHARS:
            problems.add("name", f"1-{NAME_MAX_CHARS} characters")
        check_instant(expires_at, "expires_at")
        if expires_at is not None and expires_at <= at:
            problems.add("expires_at", "must be a future time with an offset")
        problems.raise_if_any()
        return cls._create(cls.Created, id=key_id, timestamp=at, project_id=project_id,
                           organisation_id=organisation_id, name=name, prefix=prefix,
                           secret_sha256=secret_hash(secret), expires_at=expires_at,
                           allowed_ips=allowed_ips)

    def expire_by(self, expires_at: datetime, at: datetime) -> None:
        if self.revoked:
            raise Conflict("the key is revoked")
        if self.expires_at is None or expires_at < self.expires_at:
            self.trigger_event(self.ExpiryBrought, timestamp=at, expires_at=expires_at)

    def revoke(self, at: datetime) -> None:
        if self.revoked:
            raise Conflict("the key is already revoked")
        self.trigger_event(self.Revoked, timestamp=at)
