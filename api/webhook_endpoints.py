"""Admin routes for tenant webhooks (docs/WEBHOOKS.md): an organisation's endpoints (the secret
shown once, in the answer to their registration), the deliveries made to them and a re-send of
one. Commands go through domain/services/webhooks.py in a worker thread; reads come from the
webhook_endpoints read model after waiting for it to include earlier writes. Who may: the
organisation's own org_admin, or a platform role (api/permissions.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import ApiDeps, Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.problems import parse_id
from api.read_your_writes import LEDGER_POSITION_HEADER, settle, wait_caught_up
from domain.errors import FieldError, NotFound, Unavailable, ValidationFailed
from domain.services.webhooks import WebhooksService
from domain.webhook_endpoint import EVENTS_MAX, URL_MAX_CHARS
from projections import organisations
from projections import webhook_endpoints as view

# Each tenant event is sent to every subscribed endpoint: bounds one event's fan-out. Checked on
# the read model (a burst of concurrent registrations may pass it by a few).
ENDPOINTS_PER_ORGANISATION_MAX = 16


class EndpointIn(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=URL_MAX_CHARS)]
    events: Annotated[list[str], msgspec.Meta(min_length=1, max_length=EVENTS_MAX)]


class EndpointOut(msgspec.Struct, omit_defaults=True):
    id: UUID
    organisation_id: UUID
    url: str
    events: list[str]
    created_at: datetime
    secret: str | None = None  # only in the answer to the registration: never again


class EndpointList(msgspec.Struct):
    items: list[EndpointOut]


class DeliveryOut(msgspec.Struct):
    id: UUID
    endpoint_id: UUID
    event_id: UUID
    event_type: str
    created_at: datetime
    status: str  # pending | delivered | dead (dead-lettered) | cancelled (endpoint deleted)
    dead_lettered: bool
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None


class DeliveryPage(msgspec.Struct):
    items: list[DeliveryOut]
    next_cursor: str | None


def _utc(at: datetime | None) -> datetime | None:
    return None if at is None else at.astimezone(UTC)


def _delivery(row: view.DeliveryRow) -> DeliveryOut:
    return DeliveryOut(
        id=row.id, endpoint_id=row.endpoint_id, event_id=row.event_id, event_type=row.event_type,
        created_at=row.created_at.astimezone(UTC), status=row.status,
        dead_lettered=row.status == view.DEAD, attempts=row.attempts,
        next_attempt_at=_utc(row.next_attempt_at), last_attempt_at=_utc(row.last_attempt_at),
        last_status_code=row.last_status_code, last_error=row.last_error,
        delivered_at=_utc(row.delivered_at))


def _service(deps: ApiDeps) -> WebhooksService:
    if deps.webhooks is None:
        raise Unavailable("tenant webhooks are not configured in this process")
    return deps.webhooks


async def _known_organisation(deps: ApiDeps, request: Request[Any, Any, Any], org_id: UUID) -> None:
    """404 for an organisation that does not exist (a scoped caller's guard did the rest)."""
    await wait_caught_up(deps, request, organisations.NAME)

    def exists() -> bool:
        with deps.read_pool.connection() as conn:
            return organisations.get(conn, org_id) is not None

    if not await anyio.to_thread.run_sync(exists):
        raise NotFound("organisation", org_id)


class WebhookEndpointController(Controller):
    """An organisation's webhook endpoints and their deliveries."""

    path = "/admin/v1/organisations/{org_id:uuid}"
    tags = ["webhooks"]

    @post("/webhook-endpoints", status_code=201,
          summary="Register a webhook endpoint (its secret is shown in this answer only)",
          description="Body {url (http or https), events (names from docs/WEBHOOKS.md)}. A URL"
                      " whose host resolves to a loopback, private, link-local or otherwise"
                      " non-public address is refused with 422 unless the operator allows it.")
    async def register(self, org_id: FromPath[UUID], data: JSONBody[EndpointIn],
                       request: Request[Any, Any, Any], deps: Deps,
                       actor: Acting) -> Response[EndpointOut]:
        await wait_caught_up(deps, request, view.NAME)

        def count() -> int:
            with deps.read_pool.connection() as conn:
                return len(view.endpoints(conn, org_id))

        if await anyio.to_thread.run_sync(count) >= ENDPOINTS_PER_ORGANISATION_MAX:
            raise ValidationFailed([FieldError(
                "url", f"the organisation has {ENDPOINTS_PER_ORGANISATION_MAX} endpoints, the "
                       "most it may have: delete one first")])
        written = await anyio.to_thread.run_sync(partial(
            _service(deps).register, org_id, url=data.url, events=data.events, actor=actor))
        e = written.aggregate
        out = EndpointOut(e.id, e.organisation_id, e.url, list(e.events),
                          e.created_on.astimezone(UTC), secret=e.secret)
        return Response(out, status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(written.position),
                                 "Cache-Control": "no-store"})

    @get("/webhook-endpoints", summary="List the organisation's webhook endpoints (no secrets)")
    async def list_(self, org_id: FromPath[UUID], request: Request[Any, Any, Any],
                    deps: Deps) -> EndpointList:
        await _known_organisation(deps, request, org_id)
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.EndpointRow]:
            with deps.read_pool.connection() as conn:
                return view.endpoints(conn, org_id)

        rows = await anyio.to_thread.run_sync(fetch)
        return EndpointList([EndpointOut(r.id, r.organisation_id, r.url, r.events,
                                         r.created_at.astimezone(UTC)) for r in rows])

    @delete("/webhook-endpoints/{endpoint_id:uuid}", status_code=204,
            summary="Delete a webhook endpoint: nothing more is sent to it")
    async def remove(self, org_id: FromPath[UUID], endpoint_id: FromPath[UUID], deps: Deps,
                     actor: Acting) -> Response[None]:
        position = await anyio.to_thread.run_sync(partial(
            _service(deps).delete, org_id, endpoint_id, actor=actor))
        if position:
            await settle(deps, view.NAME, position)
        return Response(None, status_code=204, headers={LEDGER_POSITION_HEADER: str(position)})

    @get("/webhook-deliveries",
         summary="List deliveries to the organisation's endpoints (filter status, endpoint_id)",
         description="Oldest first: attempts, status (pending, delivered, dead = dead-lettered"
                     " after 24 h of failures, cancelled), the next attempt and the last answer.")
    async def deliveries(self, org_id: FromPath[UUID], request: Request[Any, Any, Any],
                         deps: Deps) -> DeliveryPage:
        query = request.query_params
        limit = parse_limit(query.get("limit"))
        after = decode_cursor(query.get("cursor"))
        status = query.get("status")
        if status is not None and status not in view.DELIVERY_STATUSES:
            raise ValidationFailed([FieldError("status",
                                               f"must be one of {list(view.DELIVERY_STATUSES)}")])
        raw_endpoint = query.get("endpoint_id")
        endpoint_id = parse_id(raw_endpoint, "endpoint") if raw_endpoint is not None else None
        await _known_organisation(deps, request, org_id)
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.DeliveryRow]:
            with deps.read_pool.connection() as conn:
                return view.deliveries(conn, org_id, limit + 1, after, status=status,
                                       endpoint_id=endpoint_id)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [_delivery(r) for r in rows[:limit]]
        next_cursor = (encode_cursor(items[-1].created_at, items[-1].id)
                       if len(rows) > limit else None)
        return DeliveryPage(items, next_cursor)

    @post("/webhook-deliveries/{delivery_id:uuid}/resend", status_code=202,
          summary="Send one delivery again, now (a dead-lettered one too)")
    async def resend(self, org_id: FromPath[UUID], delivery_id: FromPath[UUID],
                     request: Request[Any, Any, Any], deps: Deps,
                     actor: Acting) -> Response[DeliveryOut]:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> view.DeliveryRow | None:
            with deps.read_pool.connection() as conn:
                return view.delivery(conn, delivery_id)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None or row.organisation_id != org_id:
            raise NotFound("webhook delivery", delivery_id)
        position = await anyio.to_thread.run_sync(partial(
            _service(deps).resend, org_id, row.endpoint_id, delivery_id, actor=actor))
        await settle(deps, view.NAME, position)
        row = await anyio.to_thread.run_sync(fetch)
        assert row is not None
        return Response(_delivery(row), status_code=202,
                        headers={LEDGER_POSITION_HEADER: str(position)})
