"""Admin routes for access: admin tokens, API key rotation, and the audit trail."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting, scope_of
from api.deps import Deps
from api.pagination import ascii_digits, parse_limit
from api.problems import parse_id
from api.read_your_writes import LEDGER_POSITION_HEADER, POSITION_MAX_DIGITS, settle, wait_caught_up
from domain.access import ORG_ROLES
from domain.errors import FieldError, ValidationFailed
from projections import access, catalogue

ROTATION_OVERLAP_MAX_S = 30 * 24 * 3600
ROTATION_OVERLAP_DEFAULT_S = 24 * 3600


class CreateToken(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    name: str = "admin token"
    organisation_id: UUID | None = None
    expires_at: datetime | None = None


class TokenCreated(msgspec.Struct):
    id: UUID
    role: str
    organisation_id: UUID | None
    name: str
    expires_at: datetime | None
    token: str  # shown once; only its hash is recorded


class Rotate(msgspec.Struct, forbid_unknown_fields=True):
    overlap_s: int = ROTATION_OVERLAP_DEFAULT_S


class RotatedKey(msgspec.Struct):
    id: UUID
    project_id: UUID
    prefix: str
    key: str  # shown once
    replaces: UUID
    old_key_expires_at: datetime


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


class AccessController(Controller):
    path = "/admin/v1"
    tags = ["access"]

    @post("/tokens", summary="Create an admin token (shown once)", status_code=201)
    async def create_token(self, data: JSONBody[CreateToken],
                           deps: Deps, actor: Acting) -> Response[TokenCreated]:
        written, token = await anyio.to_thread.run_sync(partial(
            deps.access.issue_token, role=data.role, organisation_id=data.organisation_id,
            name=data.name, expires_at=data.expires_at, actor=actor))
        await settle(deps, access.NAME, written.position)
        t = written.aggregate
        return Response(TokenCreated(t.id, t.role, t.organisation_id, t.name, t.expires_at, token),
                        status_code=201, headers={LEDGER_POSITION_HEADER: str(written.position)})

    @delete("/tokens/{token_id:uuid}", summary="Revoke an admin token", status_code=204)
    async def revoke_token(self, token_id: FromPath[UUID], deps: Deps, actor: Acting) -> None:
        await anyio.to_thread.run_sync(partial(deps.access.revoke_token, token_id, actor=actor))

    @post("/api-keys/{key_id:uuid}/rotate", summary="Rotate an API key: a new key now, the old "
          "one valid for overlap_s more seconds", status_code=201)
    async def rotate_key(self, key_id: FromPath[UUID], data: JSONBody[Rotate],
                         deps: Deps, actor: Acting) -> Response[RotatedKey]:
        if not 0 <= data.overlap_s <= ROTATION_OVERLAP_MAX_S:
            raise ValidationFailed([FieldError("overlap_s", f"0 to {ROTATION_OVERLAP_MAX_S} seconds")])
        written, full = await anyio.to_thread.run_sync(partial(
            deps.access.rotate_key, key_id, timedelta(seconds=data.overlap_s), actor=actor))
        await settle(deps, catalogue.READ_MODEL.name, written.position)
        k = written.aggregate
        expires = deps.clock() + timedelta(seconds=data.overlap_s)
        return Response(RotatedKey(k.id, k.project_id, k.prefix, full, key_id, expires),
                        status_code=201, headers={LEDGER_POSITION_HEADER: str(written.position)})

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
