"""Admin routes for invoices: list, read, finalize, void (API.md, "Invoice" shape).

Every amount is an integer in paise next to `currency`; quantities and tax rates are decimal
strings; `number` is null until the invoice is finalized. Reads come from the invoices read
model (after waiting for it to include earlier writes); finalize and void answer from the
invoice as saved in the ledger. The invoice run (drafting a period) is a separate endpoint.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting, scope_of
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.invoice import STATUSES
from domain.numbering import INVOICE_PREFIX, NUMBER_MAX_CHARS
from domain.period import parse_period
from projections import invoices as view
from projections import organisations

ORDER_OLDEST, ORDER_NEWEST = "oldest", "newest"
ORDERS = (ORDER_OLDEST, ORDER_NEWEST)  # by (created_at, id); the list's `order`
# A number as the document's file name spells it (`/` -> `-`, INV-2627-000001.pdf): the list's
# `number` filter accepts that form too, so the file an admin holds finds its invoice.
FILE_NAME_NUMBER_PREFIX = f"{INVOICE_PREFIX}-"


class VoidInvoice(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None  # at most 500 characters (domain.invoice.VOID_REASON_MAX_CHARS)


class TierOut(msgspec.Struct):
    tier: int  # 1-based place in the plan's tiers
    up_to: str | None  # decimal string; null: the open-ended last tier
    quantity: str  # decimal string: the units this tier priced
    unit_price: str  # decimal string, rupees (as the plan says it, unrounded)
    flat_fee: str  # decimal string, rupees


class LineOut(msgspec.Struct):
    description: str
    metric: str | None
    quantity: str  # decimal string
    amount: int  # paise
    tiers: list[TierOut]  # a graduated or volume charge's breakdown; [] for other lines


def _line_out(line: view.InvoiceLineRow) -> LineOut:
    return LineOut(line.description, line.metric, str(line.quantity), line.amount, [
        TierOut(t.tier, None if t.up_to is None else str(t.up_to), str(t.quantity),
                str(t.unit_price), str(t.flat_fee))
        for t in line.tiers])


class TaxOut(msgspec.Struct):
    name: str  # CGST | SGST | IGST
    rate: str  # decimal string, a fraction: "0.09" is 9 %
    amount: int  # paise


class InvoiceOut(msgspec.Struct):
    id: UUID
    organisation_id: UUID
    period: str
    status: str  # draft | finalized | partially_paid | paid | void
    number: str | None  # null until finalized
    currency: str
    lines: list[LineOut]
    subtotal: int
    taxes: list[TaxOut]
    total: int
    amount_due: int
    paid: int  # paise applied from payments (a paid invoice: its total)
    plan_code: str
    plan_version: int
    plan_name: str  # the plan's name when drafted (invoices drafted before it was kept: the code)
    created_at: datetime
    finalized_at: datetime | None
    voided_at: datetime | None
    void_reason: str | None
    credited: int  # paise credited by credit notes, tax included (docs/CREDIT_NOTES.md)
    refunded: int  # paise of what was paid returned: processed refunds and out_of_band


class ListedInvoiceOut(InvoiceOut):
    """An invoice as listed: with its organisation's name (null while the organisations read
    model has not yet caught up with a brand-new organisation)."""

    organisation_name: str | None


class InvoicePage(msgspec.Struct):
    items: list[ListedInvoiceOut]
    next_cursor: str | None


def _utc(at: datetime | None) -> datetime | None:
    return None if at is None else at.astimezone(UTC)


def from_row(row: view.InvoiceRow) -> InvoiceOut:
    """An invoice in the read model's shape (from the read model, or as saved: view.row_of)
    as the API shape: the one place it is built."""
    return InvoiceOut(
        id=row.id, organisation_id=row.organisation_id, period=row.period, status=row.status,
        number=row.number, currency=row.currency,
        lines=[_line_out(x) for x in row.lines],
        subtotal=row.subtotal,
        taxes=[TaxOut(t.name, str(t.rate), t.amount) for t in row.taxes],
        total=row.total, amount_due=row.amount_due, paid=row.paid, plan_code=row.plan_code,
        plan_version=row.plan_version, plan_name=row.plan_name or row.plan_code,
        created_at=row.created_at.astimezone(UTC),
        finalized_at=_utc(row.finalized_at), voided_at=_utc(row.voided_at),
        void_reason=row.void_reason, credited=row.credited, refunded=row.refunded,
    )


def listed(row: view.ListedInvoiceRow) -> ListedInvoiceOut:
    return ListedInvoiceOut(**msgspec.structs.asdict(from_row(row)),
                            organisation_name=row.organisation_name)


class _Filters(msgspec.Struct, frozen=True):
    organisation_id: UUID | None
    status: str | None
    period: str | None
    number: str | None
    newest_first: bool


def _filters(request: Request[Any, Any, Any]) -> _Filters:
    query = request.query_params
    raw_org, status, period = query.get("organisation_id"), query.get("status"), query.get("period")
    number, order = query.get("number"), query.get("order", ORDER_OLDEST)
    errors: list[FieldError] = []
    if number is not None and not 0 < len(number) <= NUMBER_MAX_CHARS:
        errors.append(FieldError("number", f"must be 1 to {NUMBER_MAX_CHARS} characters"))
    if number is not None and number.startswith(FILE_NAME_NUMBER_PREFIX) and "/" not in number:
        number = number.replace("-", "/")  # as the PDF's file name spells it: INV-2627-000001
    if order not in ORDERS:
        errors.append(FieldError("order", f"must be one of {list(ORDERS)}"))
    organisation_id = None
    if raw_org is not None:
        try:
            organisation_id = UUID(raw_org)
        except ValueError:
            errors.append(FieldError("organisation_id", "must be a UUID"))
    if status is not None and status not in STATUSES:
        errors.append(FieldError("status", f"must be one of {list(STATUSES)}"))
    if period is not None:
        try:
            parse_period(period)
        except ValidationFailed as failed:
            errors.extend(failed.errors)
    if errors:
        raise ValidationFailed(errors)
    return _Filters(organisation_id, status, period, number, order == ORDER_NEWEST)


class InvoiceController(Controller):
    path = "/admin/v1/invoices"
    tags = ["invoices"]

    @get("/", summary="List invoices (filter by organisation_id, status, period, number;"
                       " order=oldest|newest)")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> InvoicePage:
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_cursor(request.query_params.get("cursor"))
        f = _filters(request)
        own = scope_of(request)
        if own is not None and f.organisation_id not in (None, own):
            return InvoicePage([], None)  # another organisation's invoices: as if there were none
        organisation_id = own or f.organisation_id
        await wait_caught_up(deps, request, organisations.NAME)
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.ListedInvoiceRow]:
            with deps.read_pool.connection() as conn:
                return view.page(conn, limit + 1, after, organisation_id, f.status, f.period,
                                 number=f.number, newest_first=f.newest_first)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [listed(r) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return InvoicePage(items, next_cursor)

    @get("/{invoice_id:uuid}/document", summary="The invoice as a GST tax invoice: ?format=html|pdf",
         media_type="text/html")
    async def document(self, invoice_id: FromPath[UUID],
                       request: Request[Any, Any, Any], deps: Deps) -> Response[bytes]:
        fmt = request.query_params.get("format", "html")
        if fmt not in ("html", "pdf"):
            raise ValidationFailed([FieldError("format", "must be html or pdf")])
        await wait_caught_up(deps, request, view.NAME)
        rendered = await anyio.to_thread.run_sync(deps.render_invoice, invoice_id, fmt)
        if rendered is None:
            raise NotFound("invoice", invoice_id)
        body, media_type, filename = rendered
        # A PDF is a file to keep (attachment); the HTML page is for viewing (inline). Both
        # name the same file, so "save as" gives INV-2627-000001.pdf / .html.
        disposition = "attachment" if fmt == "pdf" else "inline"
        return Response(body, media_type=media_type, headers={
            "Content-Disposition": f'{disposition}; filename="{filename}"'})

    @get("/{invoice_id:uuid}", summary="Read an invoice: lines, taxes and amounts in paise")
    async def read(self, invoice_id: FromPath[UUID],
                   request: Request[Any, Any, Any], deps: Deps) -> InvoiceOut:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> view.InvoiceRow | None:
            with deps.read_pool.connection() as conn:
                return view.get(conn, invoice_id)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None:
            raise NotFound("invoice", invoice_id)
        return from_row(row)

    @post("/{invoice_id:uuid}/finalize", status_code=200,
          summary="Finalize a draft: assign its number (gapless per financial year) and freeze it")
    async def finalize(self, invoice_id: FromPath[UUID],
                       deps: Deps, actor: Acting) -> Response[InvoiceOut]:
        written = await anyio.to_thread.run_sync(partial(deps.invoicing.finalize, invoice_id,
                                                         actor=actor))
        return Response(from_row(view.row_of(written.aggregate, written.position)),
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @post("/{invoice_id:uuid}/void", status_code=200,
          summary="Void a draft or finalized invoice (optional body {\"reason\"})")
    async def void(self, invoice_id: FromPath[UUID], deps: Deps, actor: Acting,
                   data: JSONBody[VoidInvoice | None] = None) -> Response[InvoiceOut]:
        reason = (data.reason if data is not None else None) or ""
        # Through the invoice runner: never while a run is drafting (409 then).
        written = await anyio.to_thread.run_sync(partial(deps.invoice_runner.void, invoice_id,
                                                         reason, actor=actor))
        return Response(from_row(view.row_of(written.aggregate, written.position)),
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @post("/{invoice_id:uuid}/redraft", status_code=201,
          summary="Draft a replacement for a voided invoice (409 if it is not void): the next "
                  "revision of its period, numbered when finalized")
    async def redraft(self, invoice_id: FromPath[UUID], deps: Deps,
                      actor: Acting) -> Response[InvoiceOut]:
        # Through the invoice runner: under the run's lock, never while a run is drafting.
        written = await anyio.to_thread.run_sync(partial(deps.invoice_runner.redraft, invoice_id,
                                                         actor=actor))
        return Response(from_row(view.row_of(written.aggregate, written.position)), status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(written.position),
                                 "Location": f"{self.path}/{written.aggregate.id}"})
