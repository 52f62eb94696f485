"""What Razorpay sends and answers, as we read it: the webhook envelope and the order, payment and
refund entities (only the fields we use; anything else Razorpay adds is ignored), and the
webhook signature check.

Pure: the adapter (adapters/razorpay_gateway.py) and the webhook route hand raw JSON here. The
facts to design around are in docs/PAYMENTS.md: delivery is at least once and unordered, and a
payload is a snapshot of the entity when the event happened, not its state now.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Annotated, TypeVar

import msgspec

# Webhook event types this platform acts on; any other is recorded and ignored.
PAYMENT_AUTHORIZED = "payment.authorized"
PAYMENT_CAPTURED = "payment.captured"
PAYMENT_FAILED = "payment.failed"
ORDER_PAID = "order.paid"
REFUND_CREATED = "refund.created"
REFUND_PROCESSED = "refund.processed"
REFUND_FAILED = "refund.failed"
PAYMENT_EVENTS = frozenset({PAYMENT_AUTHORIZED, PAYMENT_CAPTURED, PAYMENT_FAILED, ORDER_PAID})
REFUND_EVENTS = frozenset({REFUND_CREATED, REFUND_PROCESSED, REFUND_FAILED})
HANDLED_EVENTS = PAYMENT_EVENTS | REFUND_EVENTS

RECEIPT_MAX_CHARS = 40  # Razorpay's limit on an order's receipt
NOTES_MAX_PAIRS = 15
NOTE_MAX_CHARS = 256
EVENT_ID_MAX_CHARS = 100  # longer X-Razorpay-Event-Id values are refused (Razorpay's are ~20)
ORDER_MIN_AMOUNT_PAISE = 100  # Razorpay refuses orders under ₹1
AMOUNT_MAX_PAISE = 10**15  # far above any payment; keeps every amount inside a Postgres bigint
GATEWAY_ID_MAX_CHARS = 64
TEXT_MAX_CHARS = 500  # a failure description, as kept

# What a signed body may put into the ledger's typed fields: anything else makes the delivery
# `unreadable` (still recorded, byte for byte, in its body). Ids and codes are Razorpay's shapes;
# free text is kept only without control characters (docs/INPUT.md's rule: every read model must
# be able to store it).
GatewayId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]+$", min_length=1,
                                        max_length=GATEWAY_ID_MAX_CHARS)]
Code = Annotated[str, msgspec.Meta(pattern=r"^[a-z_]+$", min_length=1, max_length=32)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
Paise = Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_MAX_PAISE)]
EVENT_TYPE = re.compile(r"^[a-z0-9_.]{1,100}$")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str, max_chars: int = TEXT_MAX_CHARS) -> str:
    """`text` without control characters or lone surrogates, at most `max_chars`: what a
    payload's free text becomes before it is kept in the ledger's typed fields."""
    return _UNPRINTABLE.sub(" ", text)[:max_chars]


def event_type_of(name: str) -> str:
    """A delivery's event type as kept: Razorpay's dotted lowercase names, else ""."""
    return name if EVENT_TYPE.match(name) else ""


class OrderEntity(msgspec.Struct, frozen=True):
    """A Razorpay order. `amount` and `amount_paid` are paise; `status` created | attempted | paid."""

    id: GatewayId
    amount: Paise
    currency: Currency
    status: str = "created"
    receipt: str | None = None
    amount_paid: Paise = 0
    notes: dict[str, str] | list[str] = msgspec.field(default_factory=dict)


class PaymentEntity(msgspec.Struct, frozen=True):
    """A Razorpay payment as of the event that carried it. `status`: created | authorized |
    captured | refunded | failed; `captured` stays true once it was captured (also after a
    refund); `amount_refunded` is paise."""

    id: GatewayId
    amount: Paise
    currency: Currency
    status: Code
    order_id: GatewayId | None = None
    method: Code | None = None
    captured: bool = False
    amount_refunded: Paise = 0
    error_description: str | None = None  # free text: kept through printable()


class RefundEntity(msgspec.Struct, frozen=True):
    """A Razorpay refund: `status` pending | processed | failed."""

    id: GatewayId
    payment_id: GatewayId
    amount: Paise
    currency: Currency = "INR"
    status: Code = "pending"
    # What we sent with the refund (a credit note's id, its share and attempt); Razorpay sends
    # an empty array when there are none.
    notes: dict[str, str] | list[str] = msgspec.field(default_factory=dict)

    def note(self, key: str) -> str | None:
        """One of the refund's notes, or None."""
        return self.notes.get(key) if isinstance(self.notes, dict) else None


class _Wrapped(msgspec.Struct, frozen=True):
    entity: msgspec.Raw


class WebhookPayload(msgspec.Struct, frozen=True):
    payment: _Wrapped | None = None
    order: _Wrapped | None = None
    refund: _Wrapped | None = None


class Webhook(msgspec.Struct, frozen=True):
    """A webhook delivery's body: `event` names what happened; the entities it carries are in
    `payload` (read with `payment()`, `order()`, `refund()`)."""

    event: str
    payload: WebhookPayload = msgspec.field(default_factory=WebhookPayload)
    created_at: int | None = None  # unix seconds, Razorpay's clock

    def payment(self) -> PaymentEntity | None:
        return _entity(self.payload.payment, PaymentEntity)

    def order(self) -> OrderEntity | None:
        return _entity(self.payload.order, OrderEntity)

    def refund(self) -> RefundEntity | None:
        return _entity(self.payload.refund, RefundEntity)


T = TypeVar("T")


def _entity(wrapped: _Wrapped | None, kind: type[T]) -> T | None:
    if wrapped is None:
        return None
    return msgspec.json.decode(wrapped.entity, type=kind)


_WEBHOOK = msgspec.json.Decoder(Webhook)


def parse_webhook(body: bytes | str) -> Webhook:
    """The envelope of a delivery; msgspec.ValidationError / DecodeError (both ValueError) for a
    body that is not one. Entities are decoded when asked for, so an unknown event type with a
    payload of another shape is still recorded."""
    return _WEBHOOK.decode(body)


def webhook_body(event: str, *, payment: PaymentEntity | None = None,
                 order: OrderEntity | None = None, refund: RefundEntity | None = None,
                 created_at: int | None = None) -> bytes:
    """A body in Razorpay's webhook format: what the recovery job records for a payment it found
    by asking the gateway, so that it is applied exactly as the webhook would have been."""
    payload: dict[str, object] = {}
    for name, entity in (("payment", payment), ("order", order), ("refund", refund)):
        if entity is not None:
            payload[name] = {"entity": entity}
    return msgspec.json.encode({"event": event, "payload": payload, "created_at": created_at})


def signature_matches(body: bytes, signature: str | None, secrets: Sequence[str]) -> bool:
    """Whether `signature` (X-Razorpay-Signature) is the hex HMAC-SHA256 of the raw `body` under
    any of `secrets` (more than one during a rotation: Razorpay's retries of older deliveries
    still carry the old secret's signature). Constant-time per secret."""
    if not signature or not secrets:
        return False
    given = signature.strip().lower().encode()
    return any(
        hmac.compare_digest(hmac.new(s.encode(), body, hashlib.sha256).hexdigest().encode(), given)
        for s in secrets if s
    )


def checkout_signature_matches(*, stored_order_id: str, payment_id: str, signature: str,
                               key_secret: str) -> bool:
    """Razorpay Checkout's handler answer: hex HMAC-SHA256 of `order_id|payment_id` keyed with
    the key secret. `stored_order_id` is the order we recorded for the invoice, never the one
    the browser sent back (a page could swap in another order it paid for less)."""
    expected = hmac.new(key_secret.encode(), f"{stored_order_id}|{payment_id}".encode(),
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode())
