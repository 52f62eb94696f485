"""Admin routes for organisations: create, read, list, update settings, and the balance.

**Decision:** an organisation's tax facts (`TAX_FACTS`: country, state_code, gstin, currency,
timezone) decide what its invoices charge, so only the platform's billing roles
(`TAX_FACT_ROLES`: owner, billing_admin) may change them. Any other caller naming one of them
in a PATCH gets a 403 naming those fields, and nothing of that request is stored (not even
the settings it may change). A change applies from the next invoice drafted: each invoice
records the facts it was drafted with (domain.invoice.Invoice.Drafted), and a period already
drafted is never re-priced (docs/INVOICES.md).
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, patch, post
from litestar.params import FromPath, JSONBody
from psycopg_pool import ConnectionPool

from api.auth import Acting, scope_of
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.problems import Forbidden
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.access import Principal
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.organisation import SETTING_NAMES, Organisation, OrganisationSettings, canonical_cidrs
from projections import invoices, organisations
from projections import organisations as view

TAX_FACTS = ("country", "state_code", "gstin", "currency", "timezone")
TAX_FACT_ROLES = frozenset({"owner", "billing_admin"})


class CreateOrganisation(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    billing_email: str
    currency: str | None = None
    timezone: str | None = None
    country: str | None = None
    gstin: str | None = None
    state_code: str | None = None


class RateLimit(msgspec.Struct, forbid_unknown_fields=True):
    per_second: int
    burst: int


class UpdateOrganisation(msgspec.Struct, forbid_unknown_fields=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    billing_email: str | msgspec.UnsetType = msgspec.UNSET
    currency: str | msgspec.UnsetType = msgspec.UNSET
    timezone: str | msgspec.UnsetType = msgspec.UNSET
    country: str | msgspec.UnsetType = msgspec.UNSET
    gstin: str | msgspec.UnsetType | None = msgspec.UNSET
    state_code: str | msgspec.UnsetType | None = msgspec.UNSET
    allowed_ips: list[str] | msgspec.UnsetType = msgspec.UNSET
    rate_limit: RateLimit | msgspec.UnsetType = msgspec.UNSET
    suspended: bool | msgspec.UnsetType = msgspec.UNSET
    suspend_reason: str = ""


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
    suspended: bool
    allowed_ips: list[str]
    rate_limit: RateLimit


class OrganisationPage(msgspec.Struct):
    items: list[OrganisationOut]
    next_cursor: str | None


def _given(data: CreateOrganisation) -> OrganisationSettings:
    fields: dict[str, Any] = msgspec.structs.asdict(data)
    return OrganisationSettings(**{k: v for k, v in fields.items() if v is not None})


def _out(org: Organisation) -> OrganisationOut:
    """The organisation as saved (what create and update answer)."""
    return _from_row(view.row_of(org))


def _from_row(row: view.OrganisationRow) -> OrganisationOut:
    """An organisation in the read model's shape as the API shape: the one place it is built."""
    return OrganisationOut(
        id=row.id, name=row.name, billing_email=row.billing_email, currency=row.currency,
        timezone=row.timezone, country=row.country, gstin=row.gstin, state_code=row.state_code,
        created_at=row.created_at, updated_at=row.updated_at, suspended=row.suspended,
        allowed_ips=[ip for ip in row.allowed_ips.split(",") if ip],
        rate_limit=RateLimit(row.rate_limit_per_s, row.rate_limit_burst),
    )


def _changes(data: UpdateOrganisation) -> OrganisationSettings:
    fields = msgspec.structs.asdict(data)
    changes: dict[str, Any] = {k: v for k, v in fields.items() if k in SETTING_NAMES}
    if data.allowed_ips is not msgspec.UNSET:
        try:
            changes["allowed_ips"] = canonical_cidrs(data.allowed_ips)
        except ValueError as e:
            raise ValidationFailed([FieldError("allowed_ips", f"invalid: {e}")]) from None
    if data.rate_limit is not msgspec.UNSET:
        changes["rate_limit_per_s"] = data.rate_limit.per_second
        changes["rate_limit_burst"] = data.rate_limit.burst
    return OrganisationSettings(**changes)


def _check_may_change_tax_facts(principal: Principal, data: UpdateOrganisation) -> None:
    """403 naming the tax facts a caller outside TAX_FACT_ROLES asked to change (an explicit
    null, e.g. clearing the GSTIN, is a change too)."""
    named = [name for name in TAX_FACTS if getattr(data, name) is not msgspec.UNSET]
    if named and principal.role not in TAX_FACT_ROLES:
        raise Forbidden(
            f"the {principal.role} role may not change {', '.join(named)}: these tax facts decide "
            f"what invoices charge; only {' or '.join(sorted(TAX_FACT_ROLES))} may change them "
            "(from the next invoice on). Nothing was changed.")


def _read(pool: ConnectionPool, org_id: UUID) -> OrganisationOut:
    with pool.connection() as conn:
        row = view.get(conn, org_id)
    if row is None:
        raise NotFound("organisation", org_id)
    return _from_row(row)


class OrganisationController(Controller):
    path = "/admin/v1/organisations"
    tags = ["organisations"]

    @post("/", status_code=201, summary="Create an organisation")
    async def create(
        self, data: JSONBody[CreateOrganisation], deps: Deps, actor: Acting
    ) -> Response[OrganisationOut]:
        written = await anyio.to_thread.run_sync(partial(
            deps.organisations.create, _given(data), actor=actor))
        org = written.aggregate
        return Response(
            _out(org), status_code=201,
            headers={LEDGER_POSITION_HEADER: str(written.position),
                     "Location": f"{self.path}/{org.id}"},
        )

    @get("/", summary="List organisations")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> OrganisationPage:
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_cursor(request.query_params.get("cursor"))
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.OrganisationRow]:
            with deps.read_pool.connection() as conn:
                return view.page(conn, limit + 1, after)

        own = scope_of(request)
        if own is not None:  # an organisation-scoped caller lists only its own
            row = await anyio.to_thread.run_sync(_read, deps.read_pool, own)
            return OrganisationPage([row] if after is None else [], None)
        rows = await anyio.to_thread.run_sync(fetch)
        items = [_from_row(r) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return OrganisationPage(items, next_cursor)

    @get("/{org_id:uuid}", summary="Read an organisation")
    async def read(self, org_id: FromPath[UUID],
                   request: Request[Any, Any, Any], deps: Deps) -> OrganisationOut:
        await wait_caught_up(deps, request, view.NAME)
        return await anyio.to_thread.run_sync(_read, deps.read_pool, org_id)

    @patch("/{org_id:uuid}", summary="Update an organisation's settings")
    async def update(
        self, org_id: FromPath[UUID], data: JSONBody[UpdateOrganisation],
        request: Request[Any, Any, Any], deps: Deps, actor: Acting
    ) -> Response[OrganisationOut]:
        _check_may_change_tax_facts(request.state.principal, data)
        changes = _changes(data)
        suspended = None if data.suspended is msgspec.UNSET else data.suspended
        limits = changes.rate_limit_per_s is not msgspec.UNSET
        if scope_of(request) is not None and (suspended is not None or limits):
            raise Forbidden("suspension and rate limits are set by the platform's operators")
        if not changes and suspended is None:
            raise ValidationFailed([FieldError("body", "name at least one setting to change")])
        written = await anyio.to_thread.run_sync(partial(
            deps.organisations.update_settings, org_id, changes, suspended=suspended,
            reason=data.suspend_reason, actor=actor))
        return Response(
            _out(written.aggregate), headers={LEDGER_POSITION_HEADER: str(written.position)}
        )


class BalanceOut(msgspec.Struct):
    organisation_id: UUID
    currency: str
    outstanding: int  # paise: amount due of finalized and partly paid invoices
    invoiced: int  # paise: totals of finalized, partly paid and paid invoices
    paid: int  # paise: what payments applied to those invoices
    credited: int = 0  # paise: credit notes on those invoices, tax included
    refunded: int = 0  # paise: of what was paid, returned (processed refunds, out_of_band)
    # paise: invoiced - credited - paid + refunded. Positive: the organisation owes it; negative:
    # it is owed (a refund not yet processed). Equals outstanding once every refund is processed.
    balance: int = 0


@get("/admin/v1/organisations/{org_id:uuid}/balance", tags=["invoices"],
     summary="What the organisation owes (amount due of its finalized and partly paid invoices),"
             " was invoiced and paid (paise)")
async def organisation_balance(org_id: FromPath[UUID],
                               request: Request[Any, Any, Any], deps: Deps) -> BalanceOut:
    await wait_caught_up(deps, request, invoices.NAME)

    def fetch() -> tuple[organisations.OrganisationRow | None, int, tuple[int, int],
                         tuple[int, int]]:
        with deps.read_pool.connection() as conn:
            return (view.get(conn, org_id), invoices.outstanding(conn, org_id),
                    invoices.billed_and_paid(conn, org_id),
                    invoices.credited_and_refunded(conn, org_id))

    org, owed, (invoiced, paid), (credited, refunded) = await anyio.to_thread.run_sync(fetch)
    if org is None:
        raise NotFound("organisation", org_id)
    return BalanceOut(org_id, org.currency, owed, invoiced, paid, credited, refunded,
                      invoiced - credited - paid + refunded)
