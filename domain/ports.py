"""Ports: the small interfaces that adapters implement for the domain's services."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Literal, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.audit import Recorded
from domain.usage import MeterRule, UsageBatch

A = TypeVar("A", bound=Aggregate)


class Ledger(Protocol):
    """The append-only event store, seen from an application service."""

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        """Return the aggregate, or raise NotFound."""
        ...

    def save(self, *aggregates: Aggregate) -> int:
        """Append pending events atomically; return the ledger position of the last one.

        Raises Conflict when an aggregate id or version already exists, Unavailable when
        the ledger cannot commit.
        """
        ...


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


@dataclass(frozen=True)
class Appended:
    """What a usage append did: new events, resent ones, and the position to wait for."""

    accepted: int
    duplicates: int
    position: int


@dataclass(frozen=True)
class KeyRecord:
    """A project API key as the ingestion path sees it (from the key cache)."""

    key_id: UUID
    prefix: str
    secret_sha256: str
    project_id: UUID
    organisation_id: UUID
    timezone: str
    expires_at: datetime | None
    revoked: bool
    allowed_ips: str = ""
    organisation_allowed_ips: str = ""
    suspended: bool = False
    rate_per_s: int = 100
    rate_burst: int = 200

    @cached_property
    def rate_key(self) -> str:
        """The rate limiter's bucket: one per organisation, shared by all its projects' keys (a
        bucket per key let a tenant multiply its limit by making keys). Made once per record."""
        return f"org:{self.organisation_id}"


@dataclass(frozen=True)
class TokenRecord:
    """An admin token as the admin guard sees it (from the token cache)."""

    token_id: UUID
    token_sha256: str
    role: str
    organisation_id: UUID | None
    expires_at: datetime | None
    revoked: bool
    organisation_allowed_ips: str = ""  # an organisation-scoped token's organisation's CIDRs


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


@dataclass
class Blocked:
    """An organisation the invoice run left alone: dead-lettered ledger entries can affect it.
    `read_models` names, per read model, the positions that block it; `missing_positions` is
    all of them, sorted."""

    organisation_id: UUID
    name: str
    missing_positions: list[int]
    read_models: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RunResult:
    period: str
    created: int = 0
    existing: int = 0
    skipped: int = 0
    not_due: int = 0
    failed: int = 0
    blocked: list[Blocked] = field(default_factory=list)
    failed_organisations: list[UUID] = field(default_factory=list)  # each logged with its error


class InvoiceRunner(Protocol):
    def run(self, period: str) -> RunResult: ...

    def void(self, ident: UUID, reason: str) -> Any:
        """Void an invoice, never while a run is deciding what earlier invoices billed (a
        Conflict then): a void between its reading and its drafting would lose late usage."""
        ...


@dataclass(frozen=True)
class StoredResponse:
    """An idempotent request's first answer, as kept for its retries (secrets left out)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


ClaimOutcome = Literal["claimed", "replay", "busy", "mismatch"]


@dataclass(frozen=True)
class Claim:
    """What claiming an Idempotency-Key found: ours to run (`token` proves it, `taken_over`
    when a crashed holder's lease had run out), a finished answer to replay, a holder still
    running, or the key used for another request. `claimed_at` is when this use of the key
    began: kept by a takeover, new after the key expired (it seeds the audit entry ids)."""

    outcome: ClaimOutcome
    token: UUID | None = None
    taken_over: bool = False
    claimed_at: datetime | None = None
    response: StoredResponse | None = None


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
