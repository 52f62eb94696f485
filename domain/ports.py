"""Ports: the Protocols that adapters (and infra's plain callables) implement for the
application layer (domain/services/) and the API. Only Protocols live here; the values that
cross them are in domain/records.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.audit import Actor, Recorded
from domain.gateway_events import OrderEntity, PaymentEntity, RefundEntity
from domain.records import Appended, Claim, KeyRecord, RunResult, StoredResponse, TokenRecord
from domain.usage import MeterRule, UsageBatch

A = TypeVar("A", bound=Aggregate)


class Clock(Protocol):
    """The time now (aware)."""

    def __call__(self) -> datetime: ...


class NewId(Protocol):
    """A fresh aggregate id."""

    def __call__(self) -> UUID: ...


class NewSecret(Protocol):
    """A fresh credential: (visible prefix, secret part)."""

    def __call__(self) -> tuple[str, str]: ...


class Pause(Protocol):
    """Called with the attempt number after a lost race, before deciding again."""

    def __call__(self, attempt: int, /) -> None: ...


class Ledger(Protocol):
    """The append-only event store, seen from an application service."""

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        """Return the aggregate, or raise NotFound."""
        ...

    def save(self, *aggregates: Aggregate, actor: Actor | None) -> int:
        """Append pending events atomically; return the ledger position of the last one.
        `actor` is who asked: their audit entry is saved in the same append (None: nobody's,
        a system save, unaudited).

        Raises Conflict when an aggregate id or version already exists, Unavailable when
        the ledger cannot commit.
        """
        ...

    def get_many(self, aggregate_ids: Iterable[UUID], kind: type[A]) -> dict[UUID, A]:
        """The aggregates that exist (and are a `kind`) among `aggregate_ids`, in one read."""
        ...

    def save_batch(self, groups: Sequence[Sequence[Aggregate]], *, actor: Actor | None) -> int:
        """Append every group atomically, in one append, each group with its own audit entry
        (as `save` of each group would); Conflict / Unavailable as `save`."""
        ...


class Billable(Protocol):
    """What a draft needs to know about the organisation (domain.organisation.Organisation
    fits; so does any object with these attributes, e.g. one built from the read model)."""

    @property
    def id(self) -> UUID: ...

    @property
    def currency(self) -> str: ...

    @property
    def timezone(self) -> str: ...

    @property
    def country(self) -> str: ...

    @property
    def state_code(self) -> str | None: ...

    @property
    def gstin(self) -> str | None: ...


class TrackingWaiter(Protocol):
    """Lets many readers wait on the event loop until read models include ledger positions,
    without a thread each."""

    async def head(self) -> int:
        """The ledger's newest position now."""
        ...

    async def wait_for(self, projection: str, position: int, timeout_s: float) -> None:
        """Return once `projection` has applied `position`; raise Unavailable at the deadline."""
        ...


class ProjectionGate(Protocol):
    """Lets a reader wait until a read model includes a ledger position."""

    def wait_for(self, projection: str, position: int, timeout_s: float) -> None:
        """Return once `projection` has applied `position`; raise Unavailable at the deadline."""
        ...

    def wait_until_current(self, projection: str, min_position: int, timeout_s: float) -> None:
        """Wait until `projection` includes every entry committed before this call."""
        ...


class TokenLookup(Protocol):
    async def find(self, prefix: str) -> TokenRecord | None: ...

    async def confirm_refusal(self, prefix: str, attempt: str) -> None:
        """Spend on a wrong secret for a known prefix what an unknown prefix costs."""
        ...


class Resolver(Protocol):
    """Which organisation a resource belongs to (None when it does not exist)."""

    def organisation_of(self, kind: str, ident: UUID) -> UUID | None: ...


class RateLimiter(Protocol):
    """A shared token bucket per key: (allowed, remaining, seconds until a token is back)."""

    async def take(self, key: str, per_second: int, burst: int) -> tuple[bool, int, float]: ...


class UsageRecorder(Protocol):
    """Appends validated usage to the ledger with group commit; one duplicate never rejects
    its neighbours. Raises Unavailable (503) when the ledger cannot take it now."""

    async def record(self, key: KeyRecord, batch: UsageBatch, received_at: datetime) -> Appended:
        ...


class KeyLookup(Protocol):
    """Project keys by visible prefix, from a per-process cache of the key projection."""

    async def find(self, prefix: str) -> KeyRecord | None: ...

    async def confirm_refusal(self, prefix: str, attempt: str) -> None:
        """Spend on a wrong secret for a known prefix what an unknown prefix costs."""
        ...


class MeterLookup(Protocol):
    """Meter rules by code, from a per-process cache of the meters projection."""

    async def rules(self, codes: set[str]) -> dict[str, MeterRule]: ...


class InvoiceRunner(Protocol):
    def run(self, period: str, progress: Callable[[int, int], None] | None = None, *,
            actor: Actor | None, run_id: UUID | None = None,
            on_started: Callable[[UUID], None] | None = None) -> RunResult:
        """Run `period` (recorded as `run_id`); `on_started` is told the run's id once it
        holds the run lock and its record exists."""
        ...

    def void(self, ident: UUID, reason: str, *, actor: Actor | None) -> Any:
        """Void an invoice, never while a run is deciding what earlier invoices billed (a
        Conflict then): a void between its reading and its drafting would lose late usage."""
        ...

    def redraft(self, ident: UUID, *, actor: Actor | None) -> Any:
        """Draft a replacement for a voided invoice (Conflict if it is not void, or while a run
        runs): the next revision of its period, numbered when finalized."""
        ...

    def move_start(self, call: Callable[[], Any]) -> Any:
        """`call` (a subscription's start moved earlier, into ended periods) under the run's
        lock, Conflict while a run holds it: a run that read the schedule before the move would
        draft a period the move re-prices after the move checked that period had no invoice."""
        ...


class IdempotencyStore(Protocol):
    """Admin Idempotency-Keys per principal, kept durably for the retention (docs/IDEMPOTENCY.md)."""

    def claim(self, principal_id: UUID, key: str, fingerprint: bytes) -> Claim: ...

    def complete(self, principal_id: UUID, key: str, token: UUID, response: StoredResponse) -> bool:
        """Keep the answer; False when the claim was lost (its lease ran out and was taken)."""
        ...

    def release(self, principal_id: UUID, key: str, token: UUID) -> None:
        """Forget a claim whose request changed nothing, so that a retry runs afresh."""
        ...

    def recorded(self, entry_id: UUID) -> Recorded | None:
        """The ledger's audit entry `entry_id` (an idempotent request's first save), or None."""
        ...

    def purge_expired(self) -> int: ...


class Mailer(Protocol):
    """Delivers one complete email. Raises MailUnavailable (retry later) or MailRejected
    (domain/errors.py)."""

    def send(self, msg: EmailMessage) -> None: ...


class PaymentGateway(Protocol):
    """Razorpay, through its official SDK (adapters/razorpay_gateway.py). Every call is bounded
    by a timeout and raises GatewayUnavailable (no answer: timeout, refused connection) or
    GatewayFailed (an error answer, or not the API's answer) — never a library's own error."""

    @property
    def key_id(self) -> str:
        """The public key id a checkout page is opened with."""
        ...

    def create_order(self, *, amount: int, currency: str, receipt: str,
                     notes: Mapping[str, str]) -> OrderEntity:
        """Create an order (never retried by the adapter: a POST repeated is a second order)."""
        ...

    def orders_with_receipt(self, receipt: str) -> list[OrderEntity]:
        """The orders created with `receipt`: how a retry finds an order whose creation timed
        out on our side but happened at Razorpay."""
        ...

    def order_payments(self, order_id: str) -> list[PaymentEntity]:
        """The order's payments as Razorpay holds them now (missed-webhook recovery)."""
        ...


class RefundGateway(Protocol):
    """Razorpay refunds, through its official SDK (adapters/razorpay_gateway.py); errors as
    PaymentGateway's (GatewayUnavailable, GatewayFailed)."""

    def refund(self, *, razorpay_payment_id: str, amount: int, idempotency_key: str,
               notes: Mapping[str, str]) -> RefundEntity:
        """Refund `amount` paise of a captured payment with X-Refund-Idempotency
        `idempotency_key`: the same key again answers the same refund, never a second one."""
        ...

    def fetch_refund(self, refund_id: str) -> RefundEntity:
        """A refund as Razorpay holds it now."""
        ...


class DestinationCheck(Protocol):
    """Refuses (ValidationFailed on `url`) a webhook URL whose host resolves to an address the
    platform must not call (loopback, private, link-local...); adapters/destinations.py."""

    def __call__(self, url: str, /) -> None: ...


class NewWebhookSecret(Protocol):
    """A fresh secret to sign an endpoint's deliveries with."""

    def __call__(self) -> str: ...
