"""POST /webhooks/razorpay: Razorpay's webhook deliveries, verified and recorded as they came.

Outside the admin router: no bearer token (the signature is the credential), no admin guard, no
Idempotency-Key (the event id is the idempotency key). The HMAC is over the raw bytes, so the
body is read raw and checked before anything parses it (the route opts out of the app's body
rules: a body is recorded as signed, byte for byte). A verified body is always recorded, whatever
it holds: applying it is the process manager's job (adapters/payment_manager.py), which marks
what it cannot read. So the answer is 200 for every verified delivery, and Razorpay's retries of
one are recognised by their event id (a repeat records nothing).
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, post
from litestar.openapi import ResponseSpec

from api.deps import Deps
from api.input_rules import INPUT_RULES_OPT, OWN_BODY_RULES
from api.problems import BadRequest
from api.read_your_writes import LEDGER_POSITION_HEADER
from domain.errors import PaymentsNotConfigured
from domain.gateway_events import EVENT_ID_MAX_CHARS, printable, signature_matches

SIGNATURE_HEADER = "X-Razorpay-Signature"
EVENT_ID_HEADER = "X-Razorpay-Event-Id"
DERIVED_EVENT_ID_PREFIX = "sha256:"
DERIVED_EVENT_ID_HEX_CHARS = 40  # of the SHA-256 of the body (no id given) or of a too-long id
NOT_CONFIGURED_RETRY_AFTER_S = 3600
RECORDED = "recorded"
DUPLICATE = "duplicate"


class WebhookAnswer(msgspec.Struct):
    """What a verified delivery is answered with."""

    status: str  # recorded | duplicate


def event_id_of(given: str | None, body: bytes) -> str:
    """The id a delivery is recorded under: Razorpay's X-Razorpay-Event-Id (`given`) as sent;
    without one, an id derived from the body, so that repeats of the same delivery still
    collide. One we would not store as given (longer than EVENT_ID_MAX_CHARS, or with control
    characters) is derived from the given id the same way: a verified delivery is never refused
    for its id, because Razorpay retries a refused one and then disables the webhook."""
    given = (given or "").strip()
    if not given:
        return _derived(body)
    if len(given) > EVENT_ID_MAX_CHARS or printable(given) != given:
        return _derived(given.encode("utf-8", "surrogatepass"))
    return given


def _derived(source: bytes) -> str:
    return DERIVED_EVENT_ID_PREFIX + hashlib.sha256(source).hexdigest()[:DERIVED_EVENT_ID_HEX_CHARS]


@post("/webhooks/razorpay", status_code=200, tags=["webhooks"],
      summary="Razorpay webhook deliveries (signed with the webhook secret)",
      description="The raw body must carry a valid X-Razorpay-Signature (hex HMAC-SHA256 under"
                  " one of the configured webhook secrets): else 400 and nothing is recorded."
                  " A verified delivery is recorded as it came and applied later; a repeat (same"
                  f" X-Razorpay-Event-Id) records nothing; an id over {EVENT_ID_MAX_CHARS} characters"
                  " (or with control characters) is stood for by its SHA-256, as a missing one is"
                  " by the body's. 503 when no webhook secret is configured, or when the ledger"
                  " cannot take it now (Razorpay retries).",
      responses={200: ResponseSpec(WebhookAnswer, description="recorded, or a duplicate")},
      opt={INPUT_RULES_OPT: OWN_BODY_RULES})  # the signature is over the raw body: never parsed first
async def razorpay_webhook(request: Request[Any, Any, Any], deps: Deps) -> Response[WebhookAnswer]:
    """Verify the raw body's signature, then record the delivery under its event id (a repeat
    records nothing); the process manager applies it later. 200 for every verified delivery
    (503 only while the ledger cannot take it: Razorpay retries)."""
    if not deps.webhook_secrets:
        raise PaymentsNotConfigured("payments not configured: set RAZORPAY_WEBHOOK_SECRET",
                                    retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
    body = await request.body()
    if not signature_matches(body, request.headers.get(SIGNATURE_HEADER.lower()),
                             deps.webhook_secrets):
        raise BadRequest(f"{SIGNATURE_HEADER} is missing or does not match the body")
    event_id = event_id_of(request.headers.get(EVENT_ID_HEADER.lower()), body)
    recorded = await anyio.to_thread.run_sync(partial(
        deps.payments.record_delivery, event_id=event_id, body=body))
    return Response(WebhookAnswer(RECORDED if recorded.new else DUPLICATE),
                    headers={LEDGER_POSITION_HEADER: str(recorded.position)})
