"""Admin routes for GST credit notes: issue one against an invoice, list and read them, their
document (HTML or PDF), and retrying a refund that failed (API.md, "Credit note" shape).

Issuing goes through domain/services/credit_notes.py in a worker thread; a `refund` note then
asks Razorpay for its refunds on the gateway's own threads (api/payments.gateway_limiter), and
the answer shows the note as it stands after that (refund_pending, refunded or refund_failed).
Reads come from the credit notes read model after waiting for it to include earlier writes. An
organisation-scoped caller sees only its organisation's notes (another's is a 404).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting, scope_of
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.payments import gateway_limiter
from api.problems import field_error, parse_id
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.credit_note import (
    CREDIT_NOTE_STATUSES,
    LINES_MAX,
    REFERENCE_MAX_CHARS,
    REFUND,
    CreditNote,
    note_status,
)
from domain.errors import FieldError, NotFound, Unavailable, ValidationFailed
from projections import credit_notes as view

ReasonIn = Literal["duplicate_charge", "service_deficiency", "order_change", "other"]
SettlementIn = Literal["refund", "out_of_band", "reduce_due"]


class CreditLineIn(msgspec.Struct, forbid_unknown_fields=True):
    line: Annotated[int, msgspec.Meta(ge=0)]  # the invoice line's 0-based place in `lines`
    amount: Annotated[int, msgspec.Meta(gt=0)]  # taxable value credited, paise


class CreditNoteIn(msgspec.Struct, forbid_unknown_fields=True):
    """`lines` (taxable value per invoice line) or `amount` (the note's total, tax included)."""

    reason: ReasonIn
    settlement: SettlementIn
    lines: Annotated[list[CreditLineIn], msgspec.Meta(min_length=1, max_length=LINES_MAX)] | None = None
    amount: Annotated[int, msgspec.Meta(gt=0)] | None = None
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=REFERENCE_MAX_CHARS)] | None = None


_STRICT = msgspec.json.Decoder(CreditNoteIn)


class CreditTaxOut(msgspec.Struct):
    name: str  # CGST | SGST | IGST
    rate: str  # decimal string, a fraction
    amount: int  # paise


class CreditLineOut(msgspec.Struct):
    line: int | None  # the invoice line credited; null: a whole-invoice amount
    description: str
    amount: int  # taxable value, paise
    taxes: list[CreditTaxOut]


class RefundOut(msgspec.Struct):
    """A refund share: paise refunded through one captured payment, and where it is."""

    payment_id: UUID
    razorpay_payment_id: str
    amount: int
    status: str  # pending | processed | failed | "" (not requested yet)
    razorpay_refund_id: str | None
    error: str | None  # why the last request failed (retry with POST .../retry-refund)


class CreditNoteOut(msgspec.Struct):
    """A credit note (API.md, "Credit note"); amounts in paise, `total` tax included."""

    id: UUID
    invoice_id: UUID
    organisation_id: UUID
    number: str
    invoice_number: str
    invoice_date: datetime
    reason: str
    settlement: str
    reference: str | None
    status: str  # issued | refund_pending | refunded | refund_failed
    currency: str
    lines: list[CreditLineOut]
    subtotal: int
    taxes: list[CreditTaxOut]
    total: int
    refunded: int
    refunds: list[RefundOut]
    customer_gstin: str | None
    issued_at: datetime


class CreditNotePage(msgspec.Struct):
    items: list[CreditNoteOut]
    next_cursor: str | None


def from_row(row: view.CreditNoteRow) -> CreditNoteOut:
    """A note in the read model's shape (from the read model, or as saved: row_of) as the API
    shape: the one place it is built."""
    return CreditNoteOut(
        id=row.id, invoice_id=row.invoice_id, organisation_id=row.organisation_id,
        number=row.number, invoice_number=row.invoice_number,
        invoice_date=row.invoice_date.astimezone(UTC), reason=row.reason,
        settlement=row.settlement, reference=row.reference, status=row.status,
        currency=row.currency,
        lines=[CreditLineOut(None if x.index < 0 else x.index, x.description, x.taxable,
                             [CreditTaxOut(t.name, str(t.rate), t.amount) for t in x.taxes])
               for x in row.lines],
        subtotal=row.subtotal, taxes=[CreditTaxOut(t.name, str(t.rate), t.amount) for t in row.taxes],
        total=row.total, refunded=row.refunded,
        refunds=[RefundOut(s.payment_id, s.razorpay_payment_id, s.amount, s.status, s.current,
                           s.error) for s in row.shares],
        customer_gstin=row.customer_gstin, issued_at=row.issued_at.astimezone(UTC))


def row_of(note: CreditNote, position: int) -> view.CreditNoteRow:
    """A note as saved in the ledger, in the read model's shape: what a command answers without
    waiting for the read model."""
    shares = tuple(view.ShareRow(p.payment_id, p.razorpay_payment_id, p.amount, s.attempt,
                                 s.current, dict(s.refunds), s.error, s.status)
                   for p, s in zip(note.refunds, note.shares, strict=True))
    return view.CreditNoteRow(
        id=note.id, invoice_id=note.invoice_id, organisation_id=note.organisation_id,
        number=note.number, invoice_number=note.invoice_number, invoice_date=note.invoice_date,
        reason=note.reason, settlement=note.settlement, reference=note.reference,
        status=note_status(note.settlement, note.shares), currency=note.currency,
        lines=msgspec.convert(note.lines, tuple[view.CreditNoteLineRow, ...], from_attributes=True),
        subtotal=note.subtotal,
        taxes=msgspec.convert(note.taxes, tuple[view.CreditNoteTaxRow, ...], from_attributes=True),
        total=note.total, refunded=note.refunded, shares=shares, country=note.country,
        customer_state_code=note.customer_state_code, customer_gstin=note.customer_gstin,
        supplier_state_code=note.supplier_state_code, issued_at=note.created_on,
        updated_at=note.modified_on, emailed_at=None, ledger_position=position)


def strict_body(body: bytes) -> CreditNoteIn:
    """The body read strictly: amounts JSON integers of paise (422 else)."""
    try:
        return _STRICT.decode(body)
    except msgspec.ValidationError as e:
        raise ValidationFailed([field_error(str(e))]) from None
    except msgspec.DecodeError:
        raise ValidationFailed([FieldError("body", "must be a JSON object")]) from None


async def _read(deps: Any, request: Request[Any, Any, Any], ident: UUID) -> view.CreditNoteRow:
    await wait_caught_up(deps, request, view.NAME)

    def fetch() -> view.CreditNoteRow | None:
        with deps.read_pool.connection() as conn:
            return view.get(conn, ident)

    row = await anyio.to_thread.run_sync(fetch)
    own = scope_of(request)
    if row is None or (own is not None and row.organisation_id != own):
        raise NotFound("credit note", ident)
    return row


def _service(deps: Any) -> Any:
    if deps.credit_notes is None:  # infra always wires it; an app built without it says so
        raise Unavailable("credit notes are not configured in this process", retry_after_s=60)
    return deps.credit_notes


class CreditNoteController(Controller):
    """Credit notes: issue, list, read, document, retry a refund."""

    path = "/admin/v1"
    tags = ["credit notes"]

    @post("/invoices/{invoice_id:uuid}/credit-notes", status_code=201,
          summary="Issue a GST credit note against a finalized, partly paid or paid invoice",
          description="Body {reason, settlement (refund | out_of_band | reduce_due), lines"
                      " [{line, amount (taxable paise)}] or amount (the note's total, tax"
                      " included), reference (out_of_band)}. 201 with the note and its CN/..."
                      " number; refunds are asked of Razorpay before answering. 422 (nothing"
                      " changes) for more than is left to credit, a settlement that cannot take"
                      " it, or a date past the section 34 deadline; 409 for a draft or void"
                      " invoice.")
    async def issue(self, invoice_id: FromPath[UUID], data: JSONBody[CreditNoteIn],
                    request: Request[Any, Any, Any], deps: Deps,
                    actor: Acting) -> Response[CreditNoteOut]:
        data = strict_body(await request.body())
        service = _service(deps)
        written = await anyio.to_thread.run_sync(partial(
            service.issue, invoice_id, reason=data.reason, settlement=data.settlement,
            lines=None if data.lines is None else [(x.line, x.amount) for x in data.lines],
            amount=data.amount, reference=data.reference, actor=actor))
        note, position = written.aggregate, written.position
        if note.settlement == REFUND:
            refunded = await anyio.to_thread.run_sync(
                partial(service.request_refunds, note.id), limiter=gateway_limiter())
            note, position = refunded.aggregate, max(position, refunded.position)
        return Response(from_row(row_of(note, position)), status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(position)})

    @post("/credit-notes/{credit_note_id:uuid}/retry-refund", status_code=200,
          summary="Ask Razorpay again for a credit note's failed refunds",
          description="A request that failed is repeated with its own X-Refund-Idempotency"
                      " key (never a second refund); a refund Razorpay said failed is looked up,"
                      " then asked for under the next attempt's key. 409 when nothing failed.")
    async def retry_refund(self, credit_note_id: FromPath[UUID],
                           deps: Deps, actor: Acting) -> Response[CreditNoteOut]:
        written = await anyio.to_thread.run_sync(partial(
            _service(deps).request_refunds, credit_note_id, retry=True, actor=actor),
            limiter=gateway_limiter())
        return Response(from_row(row_of(written.aggregate, written.position)),
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/credit-notes", summary="List credit notes (filter by organisation_id, invoice_id,"
                                  " status: refund_failed lists the refunds to look at)")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> CreditNotePage:
        query = request.query_params
        limit = parse_limit(query.get("limit"))
        after = decode_cursor(query.get("cursor"))
        raw_org, raw_invoice = query.get("organisation_id"), query.get("invoice_id")
        organisation_id = parse_id(raw_org, "organisation") if raw_org is not None else None
        invoice_id = parse_id(raw_invoice, "invoice") if raw_invoice is not None else None
        status = query.get("status")
        if status is not None and status not in CREDIT_NOTE_STATUSES:
            raise ValidationFailed([FieldError("status",
                                               f"must be one of {list(CREDIT_NOTE_STATUSES)}")])
        own = scope_of(request)
        if own is not None and organisation_id not in (None, own):
            return CreditNotePage([], None)  # another organisation's: as if there were none
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.CreditNoteRow]:
            with deps.read_pool.connection() as conn:
                return view.page(conn, limit + 1, after, organisation_id=own or organisation_id,
                                 invoice_id=invoice_id, status=status)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [from_row(r) for r in rows[:limit]]
        next_cursor = (encode_cursor(items[-1].issued_at, items[-1].id)
                       if len(rows) > limit else None)
        return CreditNotePage(items, next_cursor)

    @get("/credit-notes/{credit_note_id:uuid}", summary="Read a credit note")
    async def read(self, credit_note_id: FromPath[UUID], request: Request[Any, Any, Any],
                   deps: Deps) -> CreditNoteOut:
        return from_row(await _read(deps, request, credit_note_id))

    @get("/credit-notes/{credit_note_id:uuid}/document",
         summary="The credit note as a GST document: ?format=html|pdf", media_type="text/html")
    async def document(self, credit_note_id: FromPath[UUID], request: Request[Any, Any, Any],
                       deps: Deps) -> Response[bytes]:
        fmt = request.query_params.get("format", "html")
        if fmt not in ("html", "pdf"):
            raise ValidationFailed([FieldError("format", "must be html or pdf")])
        await _read(deps, request, credit_note_id)  # 404 for an unknown or another's note
        rendered = await anyio.to_thread.run_sync(deps.render_credit_note, credit_note_id, fmt)
        if rendered is None:
            raise NotFound("credit note", credit_note_id)
        body, media_type, filename = rendered
        disposition = "attachment" if fmt == "pdf" else "inline"
        return Response(body, media_type=media_type, headers={
            "Content-Disposition": f'{disposition}; filename="{filename}"'})
