"""Records: the plain values that cross the ports (domain/ports.py), as the adapters return them
and the API and the application layer read them. No behaviour beyond what a value derives."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Literal
from uuid import UUID


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


@dataclass(frozen=True)
class Blocked:
    """An organisation the invoice run left alone: dead-lettered ledger entries can affect it.
    `read_models` names, per read model, the positions that block it; `missing_positions` is
    all of them, sorted."""

    organisation_id: UUID
    name: str
    missing_positions: list[int]
    read_models: dict[str, list[int]] = field(default_factory=dict)


# The organisations a run's result names with their reason, at most: a run over many thousands
# must not answer (or log) one line per organisation; the rest are counted in `more`.
RUN_ENTRIES_MAX = 1000


@dataclass(frozen=True)
class RunEntry:
    """One organisation the invoice run did not invoice (skipped, not_due, blocked or failed),
    and why, in words an operator can act on."""

    organisation_id: UUID
    name: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class RunResult:
    """What an invoice run did, organisation by organisation, counted
    (domain/services/invoice_runs.py builds it). `entries` names the organisations not
    invoiced, with why, up to RUN_ENTRIES_MAX; `more` counts those left out of it."""

    period: str
    created: int = 0
    existing: int = 0
    skipped: int = 0
    not_due: int = 0
    failed: int = 0
    blocked: list[Blocked] = field(default_factory=list)
    failed_organisations: list[UUID] = field(default_factory=list)  # each logged with its error
    entries: list[RunEntry] = field(default_factory=list)
    more: int = 0
    run_id: UUID | None = None  # the run's record (GET /admin/v1/invoice-runs/{id})
