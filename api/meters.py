"""Admin routes for meters: define (or change one that has no usage yet), list and read one
(/admin/v1/meters, /admin/v1/meters/{code})."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import ApiDeps, Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, settle, wait_caught_up
from domain.errors import NotFound
from projections import catalogue, usage_totals

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


def _out(r: catalogue.MeterRow) -> MeterOut:
    return MeterOut(r.code, r.name, r.aggregation, r.field, list(r.group_by), r.allow_negative)


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
        return MeterList([_out(r) for r in rows])

    @get("/{code:str}", summary="Read a meter")
    async def read(self, code: FromPath[str], request: Request[Any, Any, Any], deps: Deps) -> MeterOut:
        await wait_caught_up(deps, request, catalogue.READ_MODEL.name)

        def fetch() -> catalogue.MeterRow | None:
            with deps.read_pool.connection() as conn:
                return catalogue.meter(conn, code)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None:
            raise NotFound("meter", code)
        return _out(row)
