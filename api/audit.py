"""The audit trail: who did what, when, from where (/admin/v1/audit-events). An organisation
sees what was done to it; the platform's operators appear to it as "platform"."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, get

from api.auth import scope_of
from api.deps import Deps
from api.pagination import ascii_digits, parse_limit
from api.problems import parse_id
from api.read_your_writes import POSITION_MAX_DIGITS, wait_caught_up
from domain.access import ORG_ROLES
from domain.errors import FieldError, ValidationFailed
from projections import access

PLATFORM_ACTOR = "platform"  # how an organisation-scoped caller sees the platform's operators


class AuditEvent(msgspec.Struct):
    id: UUID
    at: datetime
    actor_id: UUID | None  # None: a platform operator, as an organisation-scoped caller sees it
    role: str
    source_ip: str
    request_id: str
    action: str
    organisation_id: UUID | None
    targets: list[dict[str, str]]
    changes: list[dict[str, dict[str, str | None]]]
    ledger_position: int


class AuditPage(msgspec.Struct):
    items: list[AuditEvent]
    next_cursor: str | None


class AuditController(Controller):
    path = "/admin/v1"
    tags = ["access"]

    @get("/audit-events", summary="Who did what, when, from where (filters, pagination)")
    async def audit_events(self, request: Request[Any, Any, Any], deps: Deps) -> AuditPage:
        q = request.query_params
        limit = parse_limit(q.get("limit"))
        cursor = q.get("cursor")
        if cursor is not None and not ascii_digits(cursor, POSITION_MAX_DIGITS):
            raise ValidationFailed([FieldError("cursor", "is not a cursor this API returned")])
        organisation = scope_of(request) or (
            parse_id(q["organisation_id"], "organisation") if q.get("organisation_id") else None)
        actor = parse_id(q["actor_id"], "actor") if q.get("actor_id") else None
        since, until = _time(q.get("from"), "from"), _time(q.get("to"), "to")
        await wait_caught_up(deps, request, access.NAME)

        def fetch() -> list[access.AuditRow]:
            with deps.read_pool.connection() as conn:
                return access.audit_page(conn, limit + 1, int(cursor or 0),
                                         organisation_id=organisation, actor_id=actor,
                                         action=q.get("action"), since=since, until=until)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [msgspec.convert(r, AuditEvent, from_attributes=True) for r in rows[:limit]]
        if scope_of(request) is not None:
            items = [_as_tenant_sees_it(e) for e in items]
        more = len(rows) > limit
        return AuditPage(items, str(items[-1].ledger_position) if more else None)


def _as_tenant_sees_it(event: AuditEvent) -> AuditEvent:
    """An organisation sees what was done to it, and who of its own did it; the platform's
    operators are "platform", without their ids or addresses (they are not the tenant's to know)."""
    if event.role in ORG_ROLES:
        return event
    return msgspec.structs.replace(event, actor_id=None, role=PLATFORM_ACTOR, source_ip="")


def _time(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise ValidationFailed([FieldError(name, "must be an RFC 3339 time")]) from None
    if at.tzinfo is None:
        raise ValidationFailed([FieldError(name, "must include an offset")])
    return at
