"""Admin routes for payments: a Razorpay order for an invoice, money received by hand, and the
payments read model (API.md, "Payment" shape).

Commands go through domain/services/payments.py in a worker thread; reads come from the payments
read model after waiting for it to include earlier writes. A command that calls the gateway
holds its thread for up to two calls of RAZORPAY_TIMEOUT_S each, so it runs on threads of its own
(`gateway_limiter`, GATEWAY_THREADS per event loop), not on anyio's default ones that the webhook
needs for its append within Razorpay's 5 s: orders waiting on a slow Razorpay queue behind each
other, never in front of a webhook. A Razorpay payment's state comes from its webhooks (api/webhooks.py),
applied by the process manager: this module never changes it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
import msgspec
from anyio.lowlevel import RunVar
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting, scope_of
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from api.problems import field_error
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.payment import PAYMENT_STATUSES, REFERENCE_MAX_CHARS, Payment
from domain.services.payments import OrderOut
from projections import payments as view

# Gateway calls at once, per event loop (per API process); more wait their turn. Within the
# gateway's own connection pool (requests keeps 10 per host), so no call waits for a connection.
GATEWAY_THREADS = 8
# An anyio CapacityLimiter belongs to the event loop it was made in (tests run several loops in
# one process): one per loop, made on first use inside it.
_GATEWAY_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("payments_gateway_limiter")

ManualMethod = Literal["bank_transfer", "cheque", "upi", "other"]  # domain.payment.MANUAL_METHODS
_REVIEW_VALUES = {"true": True, "false": False}


class ManualPaymentIn(msgspec.Struct, forbid_unknown_fields=True):
    """Money received outside Razorpay, as an operator records it."""

    amount: Annotated[int, msgspec.Meta(gt=0)]  # paise, at most the amount due
    method: ManualMethod
    reference: Annotated[str, msgspec.Meta(min_length=1, max_length=REFERENCE_MAX_CHARS)]


# Litestar decodes bodies leniently ("100" or 100.0 would become 100); an amount of money is
# read strictly: a JSON integer of paise, nothing else.
_STRICT_MANUAL = msgspec.json.Decoder(ManualPaymentIn)


def gateway_limiter() -> anyio.CapacityLimiter:
    """The threads gateway-calling commands run on in this event loop (GATEWAY_THREADS), apart
    from anyio's default ones; made on first use. Call it inside the running loop."""
    try:
        return _GATEWAY_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(GATEWAY_THREADS)
        _GATEWAY_LIMITER.set(limiter)
        return limiter


def strict_manual(body: bytes) -> ManualPaymentIn:
    """A manual payment's body read strictly: the amount a JSON integer of paise (422 else)."""
    try:
        return _STRICT_MANUAL.decode(body)
    except msgspec.ValidationError as e:
        raise ValidationFailed([field_error(str(e))]) from None


class PaymentOrderOut(msgspec.Struct):
    """What a checkout page is opened with."""

    invoice_id: UUID
    razorpay_order_id: str
    amount: int  # paise: the invoice's amount due when the order was made
    currency: str
    key_id: str  # the public Razorpay key id


class PaymentOut(msgspec.Struct):
    """A payment (API.md, "Payment")."""

    id: UUID
    invoice_id: UUID | None  # null: a payment of no order of ours (flagged for review)
    organisation_id: UUID | None
    status: str  # created | authorized | captured | failed | refunded | partially_refunded
    amount: int  # paise, as the payment was made
    applied: int  # paise of it applied to the invoice
    refunded: int  # paise refunded for good
    currency: str
    method: str | None
    reference: str | None  # a manual payment's bank or cheque reference
    razorpay_order_id: str | None
    razorpay_payment_id: str | None
    review: list[str]  # why a person should look at it; empty when nothing is wrong
    created_at: datetime


class PaymentPage(msgspec.Struct):
    """A page of payments; `next_cursor` null on the last."""

    items: list[PaymentOut]
    next_cursor: str | None


def from_row(row: view.PaymentRow) -> PaymentOut:
    """A payment from the read model as the API shape."""
    return PaymentOut(
        id=row.id, invoice_id=row.invoice_id, organisation_id=row.organisation_id,
        status=row.status, amount=row.amount, applied=row.applied, refunded=row.refunded,
        currency=row.currency, method=row.method, reference=row.reference,
        razorpay_order_id=row.razorpay_order_id, razorpay_payment_id=row.razorpay_payment_id,
        review=list(row.review), created_at=row.created_at.astimezone(UTC))


def from_saved(payment: Payment) -> PaymentOut:
    """A payment as just saved (a manual payment's answer), in the same shape as from_row."""
    return PaymentOut(
        id=payment.id, invoice_id=payment.invoice_id, organisation_id=payment.organisation_id,
        status=payment.status, amount=payment.amount, applied=payment.applied,
        refunded=payment.refunded, currency=payment.currency, method=payment.method,
        reference=payment.reference, razorpay_order_id=payment.razorpay_order_id,
        razorpay_payment_id=payment.razorpay_payment_id, review=list(payment.review),
        created_at=payment.created_on.astimezone(UTC))


def _order_out(order: OrderOut) -> PaymentOrderOut:
    return PaymentOrderOut(order.invoice_id, order.razorpay_order_id, order.amount,
                           order.currency, order.key_id)


class _Filters(msgspec.Struct, frozen=True):
    invoice_id: UUID | None
    organisation_id: UUID | None
    status: str | None
    review: bool | None


def _uuid(raw: str | None, name: str, errors: list[FieldError]) -> UUID | None:
    if raw is None:
        return None
    try:
        return UUID(raw)
    except ValueError:
        errors.append(FieldError(name, "must be a UUID"))
        return None


def _filters(request: Request[Any, Any, Any]) -> _Filters:
    query = request.query_params
    errors: list[FieldError] = []
    invoice_id = _uuid(query.get("invoice_id"), "invoice_id", errors)
    organisation_id = _uuid(query.get("organisation_id"), "organisation_id", errors)
    status, raw_review = query.get("status"), query.get("review")
    if status is not None and status not in PAYMENT_STATUSES:
        errors.append(FieldError("status", f"must be one of {list(PAYMENT_STATUSES)}"))
    if raw_review is not None and raw_review not in _REVIEW_VALUES:
        errors.append(FieldError("review", "must be true or false"))
    if errors:
        raise ValidationFailed(errors)
    review = _REVIEW_VALUES[raw_review] if raw_review is not None else None
    return _Filters(invoice_id, organisation_id, status, review)


class PaymentController(Controller):
    """Orders and manual payments for an invoice, and the payments read model."""

    path = "/admin/v1"
    tags = ["payments"]

    @post("/invoices/{invoice_id:uuid}/payment-orders", status_code=201,
          summary="A Razorpay order for the invoice's amount due (200: the open one already made)",
          description="201 with the order a checkout is opened with (made now, or a create that"
                      " timed out earlier, found at Razorpay and recorded now); 200 with the same"
                      " shape when an open order for the amount due was already recorded (a retry"
                      " never makes a second order). 409 unless the invoice is finalized or"
                      " partly paid with something due; 502 when Razorpay answered with an error;"
                      " 503 when it did not answer, or payments are not configured.")
    async def create_order(self, invoice_id: FromPath[UUID], deps: Deps,
                           actor: Acting) -> Response[PaymentOrderOut]:
        """Ask the service for an order (it calls Razorpay: on the gateway's own threads)."""
        order = await anyio.to_thread.run_sync(partial(deps.payments.create_order, invoice_id,
                                                       actor=actor), limiter=gateway_limiter())
        # Recorded by this request (made now, or adopted from a create whose answer was lost):
        # 201; already recorded: 200, and nothing written.
        return Response(_order_out(order), status_code=201 if order.position else 200,
                        headers={LEDGER_POSITION_HEADER: str(order.position)})

    @post("/invoices/{invoice_id:uuid}/payments", status_code=201,
          summary="Record money received outside Razorpay (bank transfer, cheque, UPI, other)",
          description="Body {amount (paise, at most the amount due), method, reference (1-40"
                      " characters)}. The same method and reference twice for one invoice is 409,"
                      " never counted twice; so is more than the amount due.")
    async def record_manual(self, invoice_id: FromPath[UUID], data: JSONBody[ManualPaymentIn],
                            request: Request[Any, Any, Any], deps: Deps,
                            actor: Acting) -> Response[PaymentOut]:
        """Record money received by hand, applied to the invoice at once (no gateway call)."""
        # `data` documents the body in the schema; the amount is then read again, strictly.
        data = strict_manual(await request.body())
        written = await anyio.to_thread.run_sync(partial(
            deps.payments.record_manual, invoice_id, amount=data.amount, method=data.method,
            reference=data.reference, actor=actor))
        return Response(from_saved(written.aggregate), status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/payments", summary="List payments (filter by invoice_id, status, organisation_id, review)")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> PaymentPage:
        """A page of payments from the read model, filtered, within the caller's organisation."""
        limit = parse_limit(request.query_params.get("limit"))
        after = decode_cursor(request.query_params.get("cursor"))
        filters = _filters(request)
        own = scope_of(request)
        if own is not None and filters.organisation_id not in (None, own):
            return PaymentPage([], None)  # another organisation's payments: as if there were none
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.PaymentRow]:
            with deps.read_pool.connection() as conn:
                return view.page(conn, limit + 1, after, invoice_id=filters.invoice_id,
                                 status=filters.status,
                                 organisation_id=own or filters.organisation_id,
                                 review=filters.review)

        rows = await anyio.to_thread.run_sync(fetch)
        items = [from_row(r) for r in rows[:limit]]
        next_cursor = (
            encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        )
        return PaymentPage(items, next_cursor)

    @get("/payments/{payment_id:uuid}", summary="Read a payment")
    async def read(self, payment_id: FromPath[UUID], request: Request[Any, Any, Any],
                   deps: Deps) -> PaymentOut:
        """One payment from the read model (404 when another organisation's)."""
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> view.PaymentRow | None:
            with deps.read_pool.connection() as conn:
                return view.get(conn, payment_id)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None:
            raise NotFound("payment", payment_id)
        return from_row(row)
