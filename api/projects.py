"""Admin routes for projects: create one under an organisation, list an organisation's, read
one (/admin/v1/organisations/{org_id}/projects, /admin/v1/projects/{project_id})."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.errors import NotFound
from projections import catalogue, organisations


class CreateProject(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ProjectOut(msgspec.Struct):
    id: UUID
    organisation_id: UUID
    name: str
    created_at: datetime


class ProjectPage(msgspec.Struct):
    items: list[ProjectOut]
    next_cursor: str | None


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

    @get("/organisations/{org_id:uuid}/projects", summary="List an organisation's projects")
    async def list_(self, org_id: FromPath[UUID],
                    request: Request[Any, Any, Any], deps: Deps) -> ProjectPage:
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_cursor(request.query_params.get("cursor"))
        await wait_caught_up(deps, request, organisations.NAME)
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def fetch() -> list[catalogue.ProjectRow] | None:
            with deps.read_pool.connection() as conn:
                if organisations.get(conn, org_id) is None:
                    return None
                return catalogue.projects_page(conn, org_id, limit + 1, after)

        rows = await anyio.to_thread.run_sync(fetch)
        if rows is None:
            raise NotFound("organisation", org_id)
        items = [ProjectOut(r.id, r.organisation_id, r.name, r.created_at) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return ProjectPage(items, next_cursor)

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
