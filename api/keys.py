"""Admin routes for project API keys: create (the key is shown once), list (never secrets),
rotate, revoke (/admin/v1/projects/{project_id}/api-keys, /admin/v1/api-keys/{key_id})."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, settle, wait_caught_up
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.organisation import canonical_cidrs
from projections import catalogue

# Keys that still authenticate, per project: enough for every environment and a rotation's
# overlap. More is refused (422), so that keys cannot be minted without bound.
KEYS_PER_PROJECT_MAX = 25


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    expires_at: datetime | None = None
    allowed_ips: list[str] = []


class KeyOut(msgspec.Struct):
    id: UUID
    project_id: UUID
    name: str
    prefix: str
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    allowed_ips: list[str]  # CIDRs, as an organisation's; [] = every address


class KeyCreated(msgspec.Struct):
    id: UUID
    project_id: UUID
    name: str
    prefix: str
    expires_at: datetime | None
    created_at: datetime
    key: str  # shown once; only its hash is recorded
    allowed_ips: list[str]


class KeyList(msgspec.Struct):
    items: list[KeyOut]
    next_cursor: str | None = None


ROTATION_OVERLAP_MAX_S = 30 * 24 * 3600


ROTATION_OVERLAP_DEFAULT_S = 24 * 3600


class Rotate(msgspec.Struct, forbid_unknown_fields=True):
    overlap_s: int = ROTATION_OVERLAP_DEFAULT_S


class RotatedKey(msgspec.Struct):
    id: UUID
    project_id: UUID
    prefix: str
    key: str  # shown once
    replaces: UUID
    old_key_expires_at: datetime
    allowed_ips: list[str]  # the old key's, kept


def cidr_list(canonical: str) -> list[str]:
    """The ledger's comma-separated CIDRs ("" = every address) as the list the API shows."""
    return [cidr for cidr in canonical.split(",") if cidr]


class KeyController(Controller):
    path = "/admin/v1"
    tags = ["projects"]

    @post("/projects/{project_id:uuid}/api-keys", summary="Create an API key (shown once)",
          status_code=201)
    async def create_key(self, project_id: FromPath[UUID], data: JSONBody[CreateKey],
                         request: Request[Any, Any, Any], deps: Deps, actor: Acting) -> Response[KeyCreated]:
        try:
            cidrs = canonical_cidrs(data.allowed_ips)
        except ValueError as e:
            raise ValidationFailed([FieldError("allowed_ips", f"invalid: {e}")]) from None
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def live_keys() -> int:
            with deps.read_pool.connection() as conn:
                return catalogue.live_key_count(conn, project_id, deps.clock())

        if await anyio.to_thread.run_sync(live_keys) >= KEYS_PER_PROJECT_MAX:
            raise ValidationFailed([FieldError(
                "project_id", f"the project has {KEYS_PER_PROJECT_MAX} live API keys, the most it"
                " may have; revoke one it no longer uses first")])
        written, full = await anyio.to_thread.run_sync(partial(
            deps.access.issue_key, project_id, data.name, data.expires_at, allowed_ips=cidrs,
            actor=actor))
        await settle(deps, catalogue.READ_MODEL.name, written.position)
        k = written.aggregate
        out = KeyCreated(k.id, k.project_id, k.name, k.prefix, k.expires_at, k.created_on, full,
                         cidr_list(k.allowed_ips))
        return Response(out, status_code=201, headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/projects/{project_id:uuid}/api-keys", summary="List a project's API keys (never secrets)")
    async def list_keys(self, project_id: FromPath[UUID],
                        request: Request[Any, Any, Any], deps: Deps) -> KeyList:
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def fetch() -> tuple[catalogue.ProjectRow | None, list[catalogue.ApiKeyRow]]:
            with deps.read_pool.connection() as conn:
                return catalogue.project(conn, project_id), catalogue.api_keys(conn, project_id)

        project, rows = await anyio.to_thread.run_sync(fetch)
        if project is None:
            raise NotFound("project", project_id)
        return KeyList([KeyOut(r.id, r.project_id, r.name, r.prefix, r.expires_at, r.revoked_at,
                               r.created_at, cidr_list(r.allowed_ips)) for r in rows])

    @delete("/api-keys/{key_id:uuid}", summary="Revoke an API key", status_code=204)
    async def revoke_key(self, key_id: FromPath[UUID], deps: Deps, actor: Acting) -> None:
        await anyio.to_thread.run_sync(partial(deps.access.revoke_key, key_id, actor=actor))

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
        return Response(RotatedKey(k.id, k.project_id, k.prefix, full, key_id, expires,
                                   cidr_list(k.allowed_ips)),
                        status_code=201, headers={LEDGER_POSITION_HEADER: str(written.position)})
