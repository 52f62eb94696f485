"""Admin routes for organisations: create, read, list, update settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, patch, post
from litestar.params import FromPath, JSONBody
from psycopg_pool import ConnectionPool

from api.deps import ApiDeps
from api.ids import LEDGER_POSITION_HEADER, parse_id, wait_caught_up
from api.pagination import decode_cursor, encode_cursor, parse_limit
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.organisation import SETTING_NAMES, Organisation, Settings
from projections import organisations as view


class CreateOrganisation(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    billing_email: str
    currency: str | None = None
    timezone: str | None = None
    country: str | None = None
    gstin: str | None = None
    state_code: str | None = None


class UpdateOrganisation(msgspec.Struct, forbid_unknown_fields=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    billing_email: str | msgspec.UnsetType = msgspec.UNSET
    currency: str | msgspec.UnsetType = msgspec.UNSET
    timezone: str | msgspec.UnsetType = msgspec.UNSET
    country: str | msgspec.UnsetType = msgspec.UNSET
    gstin: str | msgspec.UnsetType | None = msgspec.UNSET
    state_code: str | msgspec.UnsetType | None = msgspec.UNSET


class OrganisationOut(msgspec.Struct):
    id: UUID
    name: str
    billing_email: str
    currency: str
    timezone: str
    country: str
    gstin: str | None
    state_code: str | None
    created_at: datetime
    updated_at: datetime


class OrganisationPage(msgspec.Struct):
    items: list[OrganisationOut]
    next_cursor: str | None


def _given(struct: msgspec.Struct) -> Settings:
    fields: dict[str, Any] = msgspec.structs.asdict(struct)
    return {k: v for k, v in fields.items() if v is not msgspec.UNSET and v is not None}


def _out(org: Organisation) -> OrganisationOut:
    return OrganisationOut(
        id=org.id, created_at=org.created_on, updated_at=org.modified_on,
        **{k: getattr(org, k) for k in SETTING_NAMES},
    )


def _read(pool: ConnectionPool, org_id: UUID) -> OrganisationOut:
    with pool.connection() as conn:
        row = view.get(conn, org_id)
    if row is None:
        raise NotFound("organisation", org_id)
    return msgspec.convert(row, OrganisationOut)


class OrganisationController(Controller):
    path = "/admin/v1/organisations"
    tags = ["organisations"]

    @post("/", status_code=201, summary="Create an organisation")
    async def create(
        self, data: JSONBody[CreateOrganisation], request: Request[Any, Any, Any]
    ) -> Response[OrganisationOut]:
        deps: ApiDeps = request.app.state.deps
        written = await anyio.to_thread.run_sync(deps.organisations.create, _given(data))
        org = written.aggregate
        return Response(
            _out(org), status_code=201,
            headers={LEDGER_POSITION_HEADER: str(written.position),
                     "Location": f"{self.path}/{org.id}"},
        )

    @get("/", summary="List organisations")
    async def list_(self, request: Request[Any, Any, Any]) -> OrganisationPage:
        deps: ApiDeps = request.app.state.deps
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_cursor(request.query_params.get("cursor"))
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[dict[str, Any]]:
            with deps.read_pool.connection() as conn:
                return view.page(conn, limit + 1, after)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [msgspec.convert(r, OrganisationOut) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return OrganisationPage(items, next_cursor)

    @get("/{org_id:str}", summary="Read an organisation")
    async def read(self, org_id: FromPath[str], request: Request[Any, Any, Any]) -> OrganisationOut:
        deps: ApiDeps = request.app.state.deps
        ident = parse_id(org_id, "organisation")
        await wait_caught_up(deps, request, view.NAME)
        return await anyio.to_thread.run_sync(_read, deps.read_pool, ident)

    @patch("/{org_id:str}", summary="Update an organisation's settings")
    async def update(
        self, org_id: FromPath[str], data: JSONBody[UpdateOrganisation], request: Request[Any, Any, Any]
    ) -> Response[OrganisationOut]:
        deps: ApiDeps = request.app.state.deps
        ident = parse_id(org_id, "organisation")
        changes: Settings = {
            k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET
        }
        if not changes:
            raise ValidationFailed([FieldError("body", "name at least one setting to change")])
        written = await anyio.to_thread.run_sync(deps.organisations.update_settings, ident, changes)
        return Response(
            _out(written.aggregate), headers={LEDGER_POSITION_HEADER: str(written.position)}
        )
