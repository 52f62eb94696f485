"""The audit trail: who did what, when, from where. Every admin command's events are saved
together with one AuditEntry (in the same ledger transaction), so the trail cannot miss one.

The acting principal travels with the request in a context variable set by the API's guard;
the ledger adapter reads it when it saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

# Never copied into the trail: hashes of secrets are still secrets' fingerprints.
SECRET_FIELDS = frozenset({"token_sha256", "secret_sha256"})
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


CURRENT_ACTOR: ContextVar[Actor | None] = ContextVar("billing_actor", default=None)


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
