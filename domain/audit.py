"""The audit trail: who did what, when, from where. Every admin command's events are saved
together with one AuditEntry (in the same ledger transaction), so the trail cannot miss one.

The acting principal is part of each command: the API's handlers (and the CLI) pass it as the
`actor` keyword of a service command, which hands it to the ledger's save (None: a system save,
e.g. the scheduler's invoice run, without an audit entry).

A request with an Idempotency-Key (docs/IDEMPOTENCY.md) also carries an `IdempotentRequest` in a
context variable: the audit entry of its n-th save gets the id `uuid5(seed, n)`, derived from the
principal and the key. A second execution of the same command therefore collides with the first
in the ledger, atomically with the command itself, and records nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import Conflict

# Never copied into the trail: hashes of secrets are still secrets' fingerprints.
SECRET_FIELDS = frozenset({"token_sha256", "secret_sha256",
                           "secret"})  # a tenant webhook endpoint's signing secret
_BOOKKEEPING_FIELDS = frozenset({"originator_id", "originator_version", "timestamp",
                                 "originator_topic"})
VALUE_MAX_CHARS = 500


@dataclass(frozen=True)
class Actor:
    principal_id: UUID
    role: str
    organisation_id: UUID | None
    source_ip: str
    request_id: str


# Fixed forever: changing it would make every stored key's audit ids differ from a retry's.
IDEMPOTENCY_NAMESPACE = UUID("6d0c2a51-3f0e-4b8e-9a57-1c8f0e2b7d44")


def idempotency_seed(principal_id: UUID, key: str, claimed_at: datetime) -> UUID:
    """The seed of one use of a (principal, Idempotency-Key): another principal's key is another
    seed, and so is the same key claimed afresh after it expired (a new `claimed_at`). In UTC:
    a process whose Postgres session has another TimeZone must derive the same seed."""
    at = claimed_at.astimezone(UTC).isoformat()
    return uuid5(IDEMPOTENCY_NAMESPACE, f"{principal_id}\n{key}\n{at}")


@dataclass
class IdempotentRequest:
    """One request under an Idempotency-Key, as the ledger sees it while saving.

    `saves` counts the saves of this request that committed an audit entry; a failed save
    does not count, so a re-execution of the same command derives the same ids in the same
    order. `recorded` is set by the ledger when a save collided with an entry an earlier
    execution of this key committed: the command had already been carried out."""

    seed: UUID
    saves: int = 0
    recorded: Recorded | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def entry_id(self) -> UUID:
        """The audit entry id of the next save (saves within one request are sequential)."""
        with self._lock:
            return uuid5(self.seed, str(self.saves))

    def first_entry_id(self) -> UUID:
        """The audit entry id of the request's first save: present once the command committed."""
        return uuid5(self.seed, "0")

    def saved(self) -> None:
        with self._lock:
            self.saves += 1


@dataclass(frozen=True)
class Recorded:
    """What an earlier execution of the same idempotent request committed (from its entry)."""

    entry_id: UUID
    targets: list[dict[str, str]]


CURRENT_IDEMPOTENCY: ContextVar[IdempotentRequest | None] = ContextVar(
    "billing_idempotency", default=None)


class AlreadyRecorded(Conflict):
    """A save of an idempotent request collided with the audit entry of an earlier execution of
    the same (principal, key): the command was carried out before, and nothing more is saved."""

    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded
        super().__init__(f"this Idempotency-Key's request was already carried out "
                         f"(audit entry {recorded.entry_id})")


class AuditEntry(Aggregate):
    class Recorded(Aggregate.Created):
        actor_id: UUID
        role: str
        source_ip: str
        request_id: str
        action: str
        organisation_id: UUID | None
        targets: list[dict[str, str]]
        changes: list[dict[str, dict[str, str | None]]]

    def __init__(self, actor_id: UUID, role: str, source_ip: str, request_id: str, action: str,
                 organisation_id: UUID | None, targets: list[dict[str, str]],
                 changes: list[dict[str, dict[str, str | None]]]) -> None:
        self.actor_id = actor_id
        self.action = action
        self.targets = targets  # read back when an idempotent retry collides with this entry


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, Decimal, UUID, datetime, bool)):
        return str(value)[:VALUE_MAX_CHARS]
    return repr(value)[:VALUE_MAX_CHARS]


def _change(event: Any) -> dict[str, dict[str, str | None]]:
    fields = {k: v for k, v in vars(event).items()
              if k not in _BOOKKEEPING_FIELDS and k not in SECRET_FIELDS}
    before, after = fields.pop("before", None), fields.pop("after", None)
    if isinstance(before, dict) and isinstance(after, dict):
        return {"before": {k: _text(v) for k, v in before.items()},
                "after": {k: _text(v) for k, v in after.items()}}
    return {"before": {}, "after": {k: _text(v) for k, v in fields.items()}}


def _organisation_of(aggregate: Aggregate, events: Sequence[Any]) -> UUID | None:
    if type(aggregate).__name__ == "Organisation":
        return aggregate.id
    for event in events:
        org = getattr(event, "organisation_id", None)
        if isinstance(org, UUID):
            return org
    org = getattr(aggregate, "organisation_id", None)
    return org if isinstance(org, UUID) else None


def describe(
    actor: Actor, aggregates: Sequence[Aggregate], entry_id: UUID, at: datetime
) -> AuditEntry | None:
    """The audit entry for saving `aggregates` (their pending events) on behalf of `actor`."""
    targets: list[dict[str, str]] = []
    changes: list[dict[str, dict[str, str | None]]] = []
    actions: list[str] = []
    organisation: UUID | None = None
    for aggregate in aggregates:
        events = list(aggregate.pending_events)
        if not events or isinstance(aggregate, AuditEntry):
            continue
        targets.append({"type": type(aggregate).__name__, "id": str(aggregate.id)})
        actions += [type(e).__qualname__ for e in events]
        changes += [_change(e) for e in events]
        organisation = organisation or _organisation_of(aggregate, events)
    if not targets:
        return None
    return AuditEntry._create(
        AuditEntry.Recorded, id=entry_id, timestamp=at, actor_id=actor.principal_id,
        role=actor.role, source_ip=actor.source_ip, request_id=actor.request_id,
        action=", ".join(dict.fromkeys(actions)), organisation_id=organisation, targets=targets,
        changes=changes,
    )
