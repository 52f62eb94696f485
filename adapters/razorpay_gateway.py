"""The PaymentGateway port (domain/ports.py) over Razorpay's official SDK: creating an order,
finding orders by receipt, listing an order's payments, refunding a payment (with
X-Refund-Idempotency) and reading a refund.

What this module owns:
- Checking an order's fields against Razorpay's limits before any HTTP call (ValueError), so a
  request that Razorpay would refuse never leaves the process.
- Bounding every call: the SDK has no default timeout, so each call passes `timeout=`; its
  retries stay off, because a repeated POST /orders is a second order (a caller that timed out
  looks the order up by receipt instead).
- Turning every failure into one of two domain errors, in one place (`_call`): no answer
  (timeout, refused or dropped connection) is GatewayUnavailable; an error answer, a body that
  is not JSON, or JSON of the wrong shape is GatewayFailed. Nothing from `razorpay` or
  `requests` escapes, and no message carries the key secret.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import msgspec
import razorpay
import razorpay.errors
import requests

from domain.errors import GatewayFailed, GatewayUnavailable
from domain.gateway_events import (
    NOTE_MAX_CHARS,
    NOTES_MAX_PAIRS,
    RECEIPT_MAX_CHARS,
    OrderEntity,
    PaymentEntity,
    RefundEntity,
)

DEFAULT_TIMEOUT_S = 10.0  # per HTTP call: connecting, and then waiting for each read
RECEIPT_LOOKUP_MAX_ORDERS = 100  # Razorpay's largest page (`count`); one receipt has a handful
CURRENCY_CODE_CHARS = 3  # ISO 4217
SECRET_PLACEHOLDER = "<key secret>"
REFUND_IDEMPOTENCY_HEADER = "X-Refund-Idempotency"
REFUND_KEY_MIN_CHARS = 10  # Razorpay's shortest idempotency key
# Razorpay's key secrets are 24 characters; a shorter one is a test value, and replacing it
# wherever it happens to occur would garble the message without protecting anything.
SECRET_SCRUB_MIN_CHARS = 8

T = TypeVar("T")


class _OrderCollection(msgspec.Struct, frozen=True):
    items: list[OrderEntity]


class _PaymentCollection(msgspec.Struct, frozen=True):
    items: list[PaymentEntity]


class RazorpayGateway:
    """Razorpay through `razorpay.Client`, with its own `requests.Session` (connections are not
    shared with anything else) and retries off. `base_url` (no `/v1`) points it elsewhere, e.g.
    at infra/fake_razorpay.py; None is Razorpay's own API."""

    def __init__(self, *, key_id: str, key_secret: str, base_url: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not key_id or not key_secret:
            raise ValueError("Razorpay needs a key id and a key secret")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._key_id = key_id
        self._key_secret = key_secret
        self._timeout_s = timeout_s
        self._session = requests.Session()
        options: dict[str, Any] = {} if base_url is None else {"base_url": base_url.rstrip("/")}
        self._client: Any = razorpay.Client(session=self._session, auth=(key_id, key_secret),
                                            **options)
        # Off is the SDK's default today; said out loud because a retried POST /orders would
        # make a second order, and a later SDK version could change the default.
        self._client.enable_retry(False)

    def __repr__(self) -> str:  # never shows the secret
        return f"RazorpayGateway(key_id={self._key_id!r}, base_url={self._client.base_url!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def close(self) -> None:
        """Closes the pooled connections (the gateway is unusable afterwards)."""
        self._session.close()

    def create_order(self, *, amount: int, currency: str, receipt: str,
                     notes: Mapping[str, str]) -> OrderEntity:
        _check_order(amount=amount, currency=currency, receipt=receipt, notes=notes)
        request = {
            "amount": amount,
            "currency": currency,
            "receipt": receipt,
            "notes": dict(notes),
            # One payment settles the order: a part payment would leave an invoice half paid.
            "partial_payment": False,
        }
        with self._call("create order"):
            answer = self._client.order.create(request, timeout=self._timeout_s)
            return _shaped(answer, OrderEntity)

    def orders_with_receipt(self, receipt: str) -> list[OrderEntity]:
        query = {"receipt": receipt, "count": RECEIPT_LOOKUP_MAX_ORDERS}
        with self._call("list orders by receipt"):
            answer = self._client.order.all(query, timeout=self._timeout_s)
            return _shaped(answer, _OrderCollection).items

    def order_payments(self, order_id: str) -> list[PaymentEntity]:
        if not order_id:
            raise ValueError("order_id must not be empty")
        with self._call(f"list payments of {order_id}"):
            answer = self._client.order.payments(order_id, timeout=self._timeout_s)
            return _shaped(answer, _PaymentCollection).items

    def refund(self, *, razorpay_payment_id: str, amount: int, idempotency_key: str,
               notes: Mapping[str, str]) -> RefundEntity:
        """POST /payments/{id}/refund with X-Refund-Idempotency: a retry with the same key
        answers the refund already made (so it may be repeated after no answer)."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"amount must be a positive integer of paise, got {amount!r}")
        if len(idempotency_key) < REFUND_KEY_MIN_CHARS:
            raise ValueError(f"X-Refund-Idempotency must be at least {REFUND_KEY_MIN_CHARS} "
                             "characters")
        if len(notes) > NOTES_MAX_PAIRS:
            raise ValueError(f"{len(notes)} notes, Razorpay allows {NOTES_MAX_PAIRS} pairs")
        with self._call(f"refund {razorpay_payment_id}"):
            answer = self._client.payment.refund(
                razorpay_payment_id, {"amount": amount, "notes": dict(notes)},
                headers={REFUND_IDEMPOTENCY_HEADER: idempotency_key}, timeout=self._timeout_s)
            return _shaped(answer, RefundEntity)

    def fetch_refund(self, refund_id: str) -> RefundEntity:
        if not refund_id:
            raise ValueError("refund_id must not be empty")
        with self._call(f"fetch refund {refund_id}"):
            return _shaped(self._client.refund.fetch(refund_id, timeout=self._timeout_s),
                           RefundEntity)

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        """The only place a library error becomes a domain error. Wraps the SDK call and the
        reading of its answer, nothing else, so the broad catches below only see the answer's
        faults."""
        try:
            yield
        # ConnectTimeout is both a Timeout and a ConnectionError: either way no answer came.
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as e:
            raise GatewayUnavailable(self._message(operation, "no answer", e)) from e
        except (razorpay.errors.BadRequestError, razorpay.errors.GatewayError,
                razorpay.errors.ServerError) as e:
            raise GatewayFailed(self._message(operation, "error answer", e)) from e
        except msgspec.ValidationError as e:
            raise GatewayFailed(self._message(operation, "answer of the wrong shape", e)) from e
        # requests' JSONDecodeError (a body that is not JSON) is a RequestException and a
        # ValueError; other RequestExceptions are a broken answer (bad chunking, encoding).
        except (requests.exceptions.RequestException, ValueError) as e:
            raise GatewayFailed(self._message(operation, "not the API's answer", e)) from e
        # The SDK indexes an error body without checking its type (`'error' in body`,
        # body['error']['code']): JSON that is not Razorpay's error object ends up here.
        except (TypeError, KeyError, AttributeError) as e:
            raise GatewayFailed(self._message(operation, "unreadable error answer", e)) from e

    def _message(self, operation: str, kind: str, error: BaseException) -> str:
        # Only the SDK's description or requests' summary; neither should hold the secret, but
        # a message ends up in logs and API answers, so make sure.
        cause = f"{type(error).__name__}: {error}"
        if len(self._key_secret) >= SECRET_SCRUB_MIN_CHARS:
            cause = cause.replace(self._key_secret, SECRET_PLACEHOLDER)
        return f"Razorpay {operation}: {kind} ({cause})"


def _shaped(answer: object, kind: type[T]) -> T:
    """The answer as `kind`; msgspec.ValidationError when a field is missing or mistyped (the
    SDK answers a 204 with the string "{}", which fails here too)."""
    return msgspec.convert(answer, kind)


def _check_order(*, amount: int, currency: str, receipt: str, notes: Mapping[str, str]) -> None:
    """Razorpay's limits, checked before the call (ValueError). bool is refused although it
    is an int: True paise is a bug, not an amount."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"amount must be a positive integer of paise, got {amount!r}")
    if not (isinstance(currency, str) and len(currency) == CURRENCY_CODE_CHARS
            and currency.isascii() and currency.isalpha() and currency.isupper()):
        raise ValueError(f"currency must be an ISO 4217 code like INR, got {currency!r}")
    if not isinstance(receipt, str) or not receipt:
        raise ValueError("receipt must be a non-empty string (orders are found again by it)")
    if len(receipt) > RECEIPT_MAX_CHARS:
        raise ValueError(f"receipt has {len(receipt)} characters, Razorpay allows {RECEIPT_MAX_CHARS}")
    if len(notes) > NOTES_MAX_PAIRS:
        raise ValueError(f"{len(notes)} notes, Razorpay allows {NOTES_MAX_PAIRS} pairs")
    for key, value in notes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"note {key!r} must map a string to a string")
        if len(key) > NOTE_MAX_CHARS or len(value) > NOTE_MAX_CHARS:
            raise ValueError(f"note {key[:20]!r}… is longer than {NOTE_MAX_CHARS} characters")
