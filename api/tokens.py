"""Admin routes for admin tokens: create (the token is shown once) and revoke
(/admin/v1/tokens)."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Response, delete, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, settle
from projections import access


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


class TokenController(Controller):
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
