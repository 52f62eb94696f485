"""What the API needs from the outside, injected by infra (the API never builds adapters)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from litestar.params import SkipValidation
from psycopg_pool import ConnectionPool

from domain.ports import (
    IdempotencyStore,
    InvoiceRunner,
    KeyLookup,
    MeterLookup,
    ProjectionGate,
    RateLimiter,
    Resolver,
    TokenLookup,
    TrackingWaiter,
    UsageRecorder,
)
from domain.reconciliation import Report
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from domain.services.credit_notes import CreditNotesService
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.payments import PaymentsService
from domain.services.plans import PlansService
from domain.services.webhooks import WebhooksService

READ_WAIT_S = 5.0  # a read waits this long for its read model to include prior writes


@dataclass(frozen=True)
class OpsSnapshot:
    """Figures for /metrics that live outside this process (read at scrape time)."""

    ledger_head: int
    ledger_appends: int
    relay_position: int
    projections: dict[str, int]
    dead_letters: dict[str, int]
    blocked: dict[str, int] = field(default_factory=dict)  # period -> organisations not invoiced
    payments_for_review: int = 0  # payments a person must look at (docs/PAYMENTS.md)
    failed_deliveries: int = 0  # gateway deliveries the process manager could not apply
    refunds_failed: int = 0  # credit notes whose refund failed (docs/CREDIT_NOTES.md)
    webhook_dead_deliveries: int = 0  # tenant webhook deliveries dead-lettered (docs/WEBHOOKS.md)
    reconciliation_failed: int = 0  # 1 when the newest reconciliation found differences


@dataclass
class ApiDeps:
    organisations: OrganisationService
    catalogue: CatalogueService
    plans: PlansService
    invoicing: InvoicingService
    payments: PaymentsService
    access: AccessService
    invoice_runner: InvoiceRunner
    # (invoice id, "html" | "pdf") -> (body, media type, file name), None for an unknown invoice
    render_invoice: Callable[[UUID, str], tuple[bytes, str, str] | None]
    tokens: TokenLookup
    resolver: Resolver
    rate_limiter: RateLimiter
    role_permissions: dict[str, frozenset[str]]
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    usage: UsageRecorder
    keys: KeyLookup
    meters: MeterLookup
    clock: Callable[[], datetime]
    read_pool: ConnectionPool
    gate: ProjectionGate  # for waits inside a worker thread
    tracking: TrackingWaiter  # for waits on the event loop: no thread per waiting request
    admin_token_sha256: bytes | None
    readiness: dict[str, Callable[[], Awaitable[bool]]]
    ops_snapshot: Callable[[], OpsSnapshot]
    read_wait_s: float = READ_WAIT_S
    idempotency: IdempotencyStore | None = None  # None: the Idempotency-Key header is ignored
    metrics_token_sha256: bytes | None = None  # None: /metrics answers this host only
    # The secrets a Razorpay webhook may be signed with (old and new during a rotation);
    # empty: webhooks answer 503, payments not configured.
    webhook_secrets: tuple[str, ...] = ()
    # Configuration that lets the service run but not issue proper invoices (a missing
    # SUPPLIER_GSTIN): /health/ready shows them without failing.
    warnings: tuple[str, ...] = ()
    # Credit notes (domain/services/credit_notes.py) and their documents: (credit note id,
    # "html" | "pdf") -> (body, media type, file name), None for an unknown note.
    credit_notes: CreditNotesService | None = None
    render_credit_note: Callable[[UUID, str], tuple[bytes, str, str] | None] = lambda _i, _f: None
    # Tenant webhook endpoints (docs/WEBHOOKS.md); None: their routes answer 503.
    webhooks: WebhooksService | None = None
    # GET /admin/v1/ledger: (after, limit) -> up to `limit` (position, NDJSON line) pairs after
    # the position, in order; None: the route answers 503.
    ledger_page: Callable[[int, int], list[tuple[int, bytes]]] | None = None
    # Runs a reconciliation and records it (infra/reconcile.py): (report, ledger position).
    reconcile: Callable[..., tuple[Report, int]] | None = None


# What a handler declares to be given the deps (api/app.py provides them). Not validated: they
# are the app's own objects, not input.
Deps = SkipValidation[ApiDeps]
