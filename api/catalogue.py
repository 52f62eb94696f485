"""Admin routes for meters, projects and project API keys."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import ApiDeps, Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, settle, wait_caught_up
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.organisation import canonical_cidrs
from projections import catalogue, usage_totals

# Keys that still authenticate, per project: enough for every environment and a rotation's
# overlap. More is refused (422), so that keys cannot be minted without bound.
KEYS_PER_PROJECT_MAX = 25

FIELD_DESCRIPTION = (
    "The property an event's value is read from: for sum, max and latest, properties[field] (a"
    " number or decimal string) instead of value; for unique_count, the property whose distinct"
    " values are counted (required). An event without it is refused. A count meter takes none.")


class DefineMeter(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    name: str
    aggregation: Literal["count", "sum", "max", "unique_count", "latest"]
    field: Annotated[str | None, msgspec.Meta(description=FIELD_DESCRIPTION)] = None
    group_by: list[str] = []
    allow_negative: bool = False


class MeterOut(msgspec.Struct):
    code: str
    name: str
    aggregation: str
    field: str | None
    group_by: list[str]
    allow_negative: bool


class MeterList(msgspec.Struct):
    items: list[MeterOut]
    next_cursor: str | None = None


class CreateProject(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ProjectOut(msgspec.Struct):
    id: UUID
    organisation_id: UUID
    name: str
    created_at: datetime


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
    allowed_ips: str


class KeyCreated(msgspec.Struct):
    id: UUID
    project_id: UUID
    name: str
    prefix: str
    expires_at: datetime | None
    created_at: datetime
    key: str  # shown once; only its hash is recorded


class KeyList(msgspec.Struct):
    items: list[KeyOut]
    next_cursor: str | None = None


def _has_usage(deps: ApiDeps) -> Any:
    def check(code: str) -> bool:
        # Judge on every usage event committed before this request: one still on its way to
        # the read model counts too (else a meter could change under usage it already has).
        # Unavailable (503, retry) if the read model cannot catch up in time.
        deps.gate.wait_until_current(usage_totals.NAME, 0, deps.read_wait_s)
        with deps.read_pool.connection() as conn:
            return usage_totals.has_usage(conn, code)

    return check


class MeterController(Controller):
    path = "/admin/v1/meters"
    tags = ["meters"]

    @post("/", summary="Define a meter (or change one that has no usage yet)")
    async def define(
        self, data: JSONBody[DefineMeter], deps: Deps, actor: Acting
    ) -> Response[MeterOut]:
        written, created = await anyio.to_thread.run_sync(partial(
            deps.catalogue.define_meter, code=data.code, name=data.name,
            aggregation=data.aggregation, field=data.field, group_by=data.group_by,
            allow_negative=data.allow_negative, has_usage=_has_usage(deps), actor=actor,
        ))
        await settle(deps, catalogue.READ_MODEL.name, written.position)
        m = written.aggregate
        out = MeterOut(m.code, m.name, m.aggregation, m.field, list(m.group_by), m.allow_negative)
        return Response(out, status_code=201 if created else 200,
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/", summary="List meters")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> MeterList:
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def fetch() -> list[catalogue.MeterRow]:
            with deps.read_pool.connection() as conn:
                return catalogue.meters(conn)

        rows = await anyio.to_thread.run_sync(fetch)
        return MeterList([MeterOut(r.code, r.name, r.aggregation, r.field, list(r.group_by),
                                   r.allow_negative) for r in rows])


class ProjectController(Controller):
    path = "/admin/v1"
    tags = ["projects"]

    @post("/organisations/{org_id:uuid}/projects", summary="Create a project", status_code=201)
    async def create(self, org_id: FromPath[UUID], data: JSONBody[CreateProject],
                     deps: Deps, actor: Acting) -> Response[ProjectOut]:
        written = await anyio.to_thread.run_sync(partial(
            deps.catalogue.create_project, org_id, data.name, actor=actor))
        p = written.aggregate
        return Response(ProjectOut(p.id, p.organisation_id, p.name, p.created_on), status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/projects/{project_id:uuid}", summary="Read a project")
    async def read(self, project_id: FromPath[UUID],
                   request: Request[Any, Any, Any], deps: Deps) -> ProjectOut:
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def fetch() -> catalogue.ProjectRow | None:
            with deps.read_pool.connection() as conn:
                return catalogue.project(conn, project_id)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None:
            raise NotFound("project", project_id)
        return ProjectOut(row.id, row.organisation_id, row.name, row.created_at)

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
        out = KeyCreated(k.id, k.project_id, k.name, k.prefix, k.expires_at, k.created_on, full)
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
                               r.created_at, r.allowed_ips) for r in rows])

    @delete("/api-keys/{key_id:uuid}", summary="Revoke an API key", status_code=204)
    async def revoke_key(self, key_id: FromPath[UUID], deps: Deps, actor: Acting) -> None:
        await anyio.to_thread.run_sync(partial(deps.access.revoke_key, key_id, actor=actor))
