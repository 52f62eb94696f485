"""The tenant event catalogue and the webhook signature (docs/WEBHOOKS.md).

- `SUBJECT_FACTS`: what the sender remembers of an invoice or a payment from the ledger (its
  organisation, number, total, amount due...), each ledger event folding into the facts of the
  aggregate it belongs to. Facts are JSON values, kept by the outbox read model.
- `TENANT_EVENTS`: which ledger event becomes which tenant event, and its `data` (built from the
  event and its subject's facts, after the event; None: not this time, e.g. a payment that
  leaves something due is not `invoice.paid`). The organisation is the event's own
  `organisation_id`, else its subject's.
- `envelope`: the JSON body of one tenant event, the same for every endpoint and every attempt.
- `signature_header` / `verify`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as
  Stripe signs; `verify` refuses a timestamp older than SIGNATURE_TOLERANCE_S (a replay).

Pure: times are arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from domain.credit_note import CreditNote
from domain.invoice import Invoice
from domain.payment import Payment

SIGNATURE_HEADER = "Webhook-Signature"
EVENT_ID_HEADER = "Webhook-Id"
SIGNATURE_TOLERANCE_S = 300  # a receiver refuses a signature older (or newer) than this
SIGNATURE_SCHEME = "v1"

Facts = dict[str, Any]  # JSON values only
Data = dict[str, Any]

_NAMESPACE = UUID("3c1f7d42-8a9e-4b5d-9c61-0e2f4a8b7d13")


def event_ref(originator_id: UUID, originator_version: int) -> UUID:
    """The tenant event id of a ledger event: one per ledger event, whatever the endpoint."""
    return uuid5(_NAMESPACE, f"{originator_id}/{originator_version}")


def delivery_ref(endpoint_id: UUID, event_id: UUID) -> UUID:
    """The id of the one delivery of an event to an endpoint."""
    return uuid5(_NAMESPACE, f"delivery/{endpoint_id}/{event_id}")


# ---- what the sender remembers of each subject -----------------------------------------------

def _invoice_drafted(e: Invoice.Drafted, _: Facts) -> Facts:
    return {"organisation_id": str(e.organisation_id), "invoice_id": str(e.originator_id),
            "period": e.period, "currency": e.currency, "total": e.total,
            "amount_due": e.amount_due, "number": None}


def _invoice_finalized(e: Invoice.Finalized, facts: Facts) -> Facts:
    return {**facts, "number": e.number}


def _invoice_payment_applied(e: Invoice.PaymentApplied, facts: Facts) -> Facts:
    return {**facts, "amount_due": int(facts.get("amount_due", 0)) - e.amount}


def _payment_opened(e: Payment.Opened, _: Facts) -> Facts:
    return {"payment_id": str(e.originator_id), "amount": e.amount, "currency": e.currency,
            "method": e.method, "razorpay_payment_id": e.razorpay_payment_id,
            "organisation_id": None, "invoice_id": None}


def _payment_described(e: Payment.Described, facts: Facts) -> Facts:
    return {**facts, "amount": e.amount, "currency": e.currency, "method": e.method}


def _payment_linked(e: Payment.Linked, facts: Facts) -> Facts:
    return {**facts, "organisation_id": str(e.organisation_id), "invoice_id": str(e.invoice_id)}


def _invoice_credited(e: Invoice.Credited, facts: Facts) -> Facts:
    # A reduce_due credit note lowers what is due: invoice.paid must see the lower figure.
    return {**facts, "amount_due": int(facts.get("amount_due", 0)) - e.reduce_due}


SUBJECT_FACTS: dict[type[Any], Callable[[Any, Facts], Facts]] = {
    Invoice.Drafted: _invoice_drafted,
    Invoice.Finalized: _invoice_finalized,
    Invoice.PaymentApplied: _invoice_payment_applied,
    Invoice.Credited: _invoice_credited,
    Payment.Opened: _payment_opened,
    Payment.Described: _payment_described,
    Payment.Linked: _payment_linked,
}


# ---- the tenant events -------------------------------------------------------------------------

def _invoice(facts: Facts) -> Data:
    return {key: facts.get(key) for key in
            ("invoice_id", "number", "period", "currency", "total", "amount_due")}


def _finalized(e: Invoice.Finalized, facts: Facts) -> Data:
    return {**_invoice(facts), "finalized_at": e.finalized_at.isoformat()}


def _paid(e: Invoice.PaymentApplied, facts: Facts) -> Data | None:
    if int(facts.get("amount_due", 1)) > 0:
        return None  # partly paid: nothing to tell yet
    return {**_invoice(facts), "amount_due": 0, "payment_id": str(e.payment_id)}


def _voided(e: Invoice.Voided, facts: Facts) -> Data:
    return {**_invoice(facts), "reason": e.reason}


def _payment_failed(e: Payment.Failed, facts: Facts) -> Data:
    return {key: facts.get(key) for key in ("payment_id", "invoice_id", "amount", "currency",
                                            "method")} | {"reason": e.reason}


def _credit_note_issued(e: CreditNote.Issued, _: Facts) -> Data:
    return {"credit_note_id": str(e.originator_id), "number": e.number,
            "invoice_id": str(e.invoice_id), "invoice_number": e.invoice_number,
            "reason": e.reason, "settlement": e.settlement, "currency": e.currency,
            "subtotal": e.subtotal, "total": e.total, "issued_at": e.timestamp.isoformat()}


def _refund_processed(e: CreditNote.RefundProcessed, _: Facts) -> Data:
    return {"credit_note_id": str(e.originator_id), "invoice_id": str(e.invoice_id),
            "refund_id": e.refund_id, "razorpay_payment_id": e.razorpay_payment_id,
            "amount": e.amount}


@dataclass(frozen=True)
class TenantEvent:
    name: str
    data: Callable[[Any, Facts], Data | None]


TENANT_EVENTS: dict[type[Any], TenantEvent] = {
    Invoice.Finalized: TenantEvent("invoice.finalized", _finalized),
    Invoice.PaymentApplied: TenantEvent("invoice.paid", _paid),  # only once nothing is due
    Invoice.Voided: TenantEvent("invoice.voided", _voided),
    Payment.Failed: TenantEvent("payment.failed", _payment_failed),
    CreditNote.Issued: TenantEvent("credit_note.issued", _credit_note_issued),
    CreditNote.RefundProcessed: TenantEvent("refund.processed", _refund_processed),  # final
    # A new one: `data(event, facts) -> dict`; an event without `organisation_id` of its own
    # also needs its aggregate's creation event in SUBJECT_FACTS, giving "organisation_id".
}

# Every name a tenant may subscribe to.
EVENT_NAMES: tuple[str, ...] = tuple(dict.fromkeys(t.name for t in TENANT_EVENTS.values()))


def organisation_of(event: Any, facts: Facts) -> str | None:
    """The organisation a tenant event goes to: the event's own, else its subject's."""
    own = getattr(event, "organisation_id", None)
    if isinstance(own, UUID):
        return str(own)
    found = facts.get("organisation_id")
    return found if isinstance(found, str) else None


def envelope(event_id: UUID, name: str, organisation_id: str, created: datetime,
             data: Data) -> bytes:
    """The body sent for one tenant event: compact JSON, keys sorted (the same bytes for every
    endpoint and every attempt)."""
    return json.dumps({"id": str(event_id), "type": name, "created": int(created.timestamp()),
                       "organisation_id": organisation_id, "data": data},
                      sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of "<timestamp>.<body>" with the endpoint's secret."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},{SIGNATURE_SCHEME}={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: int,
           tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance_s` of `now`
    (what a receiver does; docs/WEBHOOKS.md has the ten lines of it)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), fields.get(SIGNATURE_SCHEME, ""))
