"""The composition root: wires settings to servers, the ledger, pools, streams, read models and
the API role. Building does no I/O; each role's runner starts what it built (infra/roles.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import uuid4

import psycopg
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from psycopg import sql
from psycopg_pool import ConnectionPool

from adapters import bookkeeping, bus, idempotency, rate_limit
from adapters.caches import KeyCache, MeterCache, PrefixCache, TokenCache
from adapters.credit_note_documents import CreditNoteNotifier
from adapters.credit_note_documents import render as render_credit_note
from adapters.destinations import DestinationGuard
from adapters.gate import PgProjectionGate, TrackingWatch
from adapters.idempotency import PgIdempotencyStore
from adapters.invoice_archive import DDL as INVOICE_ARCHIVE_DDL
from adapters.invoice_run import InvoiceRun
from adapters.ledger import LedgerStore
from adapters.ledger_export import page as ledger_export_page
from adapters.mail import OutboxMailer, SmtpMailer
from adapters.maintenance import ensure_tables
from adapters.notifier import InvoiceNotifier, Supplier
from adapters.notifier import render as render_invoice
from adapters.period_numbering import PeriodNumbering
from adapters.pg import open_pool
from adapters.rate_limit import PgRateLimiter
from adapters.razorpay_gateway import RazorpayGateway
from adapters.reconciliation import ExtraCheck, chain_check, credit_notes_check
from adapters.resolver import PgResolver
from adapters.schedule import DDL as SCHEDULE_DDL
from adapters.sealer import DDL as SEALS_DDL
from adapters.sealer import verify_chain
from adapters.tenant_webhooks import TenantWebhookSender
from adapters.usage_writer import UsageWriter, append_function_ddl
from api.deps import ApiDeps, OpsSnapshot
from api.permissions import ROLE_PERMISSIONS
from domain.api_key import PREFIX_CHARS
from domain.ports import Mailer
from domain.records import KeyRecord, TokenRecord
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from domain.services.credit_notes import CreditNotesService
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.payments import PaymentsService
from domain.services.plans import PlansService
from domain.services.webhooks import WebhooksService
from infra.embedded import embedded_servers
from infra.invoice_run_helper import helper_invoice_run
from infra.settings import Settings
from projections import access, catalogue, invoices, organisations, payments, plans, usage_totals
from projections import credit_notes as credit_notes_view
from projections import invoice_runs as invoice_run_records
from projections import webhook_endpoints as webhook_view
from projections.base import ReadModel
from projections.reconciliations import READ_MODEL as RECONCILIATIONS_MODEL
from projections.reconciliations import last_failed as last_reconciliation_failed

log = logging.getLogger("billing.infra")

READ_MODELS: tuple[ReadModel, ...] = (
    organisations.READ_MODEL,
    catalogue.READ_MODEL,
    usage_totals.READ_MODEL,
    plans.READ_MODEL,
    invoices.READ_MODEL,
    access.READ_MODEL,
    payments.READ_MODEL,
    credit_notes_view.READ_MODEL,
    webhook_view.READ_MODEL,
    RECONCILIATIONS_MODEL,
)
SCHEMA_LOCK_TIMEOUT_S = 30
ADMIN_TOKEN_FILE = "admin-token"
NATS_CLOSE_TIMEOUT_S = 5.0
READY_PG_TIMEOUT_S = 2.0  # /health/ready: waiting for a pooled connection
READY_NATS_TIMEOUT_S = 1  # /health/ready: a NATS round trip
SECRET_BYTES = 32  # of a key's secret part and of a generated admin token: 256 bits


def read_model(name: str) -> ReadModel:
    """The read model of that name; exits naming the known ones if there is none."""
    for model in READ_MODELS:
        if model.name == name:
            return model
    known = ", ".join(m.name for m in READ_MODELS)
    raise SystemExit(f"unknown read model {name!r}; known: {known}")


@contextlib.contextmanager
def servers(settings: Settings, *, fsync: bool = True) -> Iterator[tuple[str, str]]:
    """Yield (database_url, nats_url): the configured ones, or embedded servers started here."""
    with embedded_servers(
        settings.data_dir,
        need_pg=settings.database_url is None,
        need_nats=settings.nats_url is None,
        fsync=fsync,
    ) as (pg, nats):
        yield (
            settings.database_url or (pg.url if pg else ""),
            settings.nats_url or (nats.url if nats else ""),
        )


def setup_schema(database_url: str, schema: str) -> LedgerStore:
    """Create every table idempotently (one process at a time) and open the ledger."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET lock_timeout = '{}s'").format(SCHEMA_LOCK_TIMEOUT_S))
        conn.execute("SELECT pg_advisory_lock(%s)", (bookkeeping.lock_key(schema, "schema"),))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
            for statement in (*bookkeeping.DDL, *rate_limit.DDL, *idempotency.DDL):
                conn.execute(statement)
            for statement in SCHEDULE_DDL:  # the scheduler's record, for `billing status`
                conn.execute(statement)
            for statement in SEALS_DDL:
                conn.execute(statement)
            for statement in INVOICE_ARCHIVE_DDL:
                conn.execute(statement)
            for statement in invoice_run_records.DDL:  # the invoice runs' history
                conn.execute(statement)
            for model in READ_MODELS:
                for statement in model.ddl:
                    conn.execute(statement)
            ledger = LedgerStore(database_url, schema)
            conn.execute(append_function_ddl(schema, ledger.events_table, ledger.channel))
            return ledger
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (bookkeeping.lock_key(schema, "schema"),))


@dataclass
class Runtime:
    """What every process role shares, opened once from Settings: the ledger, the read pool and
    the stream names. A role's own parts are built apart (build_api) and started by its runner."""

    settings: Settings
    database_url: str
    nats_url: str
    ledger: LedgerStore
    pool: ConnectionPool
    streams: bus.Streams
    nc: NatsClient | None = None  # None until connect_nats (and again once a test closes it)
    js: JetStreamContext | None = None
    projection_pool_: ConnectionPool | None = None
    # Not copied by dataclasses.replace (init=False): a runtime with other settings builds its
    # own gateway, and closing one runtime never closes another's.
    gateway_: RazorpayGateway | None = field(default=None, init=False, repr=False)
    _gateway_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # The tenant webhook sender's clock (None: the wall clock); tests move theirs to drive retries.
    webhook_clock: Callable[[], datetime] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, settings: Settings, database_url: str, nats_url: str) -> Runtime:
        """Create the schema and every table (idempotent), open the ledger and the read pool."""
        ledger = setup_schema(database_url, settings.pg_schema)
        pool = open_pool(database_url, settings.pg_schema)
        for model in READ_MODELS:
            ensure_tables(pool, model)
        return cls(settings, database_url, nats_url, ledger, pool,
                   bus.Streams(settings.stream_prefix, settings.stream_replicas,
                               settings.stream_placement_tags))

    def projection_pool(self) -> ConnectionPool:
        """The projectors' own pool (adapters.pg.open_pool(for_projectors=True)), made once."""
        if self.projection_pool_ is None:
            self.projection_pool_ = open_pool(self.database_url, self.settings.pg_schema,
                                              for_projectors=True)
        return self.projection_pool_

    async def connect_nats(self, name: str) -> JetStreamContext:
        """Connect to NATS as `name` and make sure the streams exist."""
        self.nc = await bus.connect(self.nats_url, name)
        self.js = self.nc.jetstream(timeout=bus.REQUEST_TIMEOUT_S)
        await bus.ensure_streams(self.js, self.streams)
        return self.js

    async def close(self) -> None:
        """Close what `open` and later calls opened: NATS (bounded), the gateway, the pools and
        the ledger."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), NATS_CLOSE_TIMEOUT_S)
        self.close_gateway()
        self.pool.close()
        if self.projection_pool_ is not None:
            self.projection_pool_.close()
        self.ledger.close()

    def ops_snapshot(self, writer: UsageWriter | None = None) -> OpsSnapshot:
        """The figures for /metrics and `billing status`; `writer`: this process's usage writer,
        whose appends the ledger's own count does not include."""
        with self.pool.connection() as conn:
            return OpsSnapshot(
                ledger_head=self.ledger.head(),
                ledger_appends=self.ledger.appended_events
                + (writer.appended_events if writer else 0),
                relay_position=bookkeeping.relay_position(conn),
                projections={m.name: 0 for m in READ_MODELS} | bookkeeping.all_tracking(conn),
                dead_letters=bookkeeping.dead_letter_counts(conn),
                blocked=bookkeeping.blocked_counts(conn),
                payments_for_review=payments.review_count(conn),
                failed_deliveries=payments.failed_deliveries(conn),
                refunds_failed=credit_notes_view.refunds_failed(conn),
                webhook_dead_deliveries=webhook_view.dead_count(conn),
                reconciliation_failed=int(last_reconciliation_failed(conn)),
            )

    def invoicing(self) -> InvoicingService:
        """Invoicing over the ledger, on the wall clock."""
        return InvoicingService(self.ledger, lambda: datetime.now(UTC), pause=_jittered_pause)

    def invoice_run(self) -> InvoiceRun:
        """The invoice run over every subscribed organisation (API, CLI and scheduler), with
        the settings' helper processes for large runs (each builds its own: helper_invoice_run)."""
        return InvoiceRun(self.pool, self.ledger, self.invoicing(), self.settings.supplier_state_code,
                          lambda: datetime.now(UTC), timedelta(hours=self.settings.grace_hours),
                          self.settings.pg_schema, helpers=self.settings.invoice_run_helpers,
                          helper_recipe=partial(helper_invoice_run, self.settings,
                                                self.database_url))

    def period_numbering(self) -> PeriodNumbering:
        """Finalize-and-number a period's drafts in batches (the CLI, the bench)."""
        return PeriodNumbering(self.pool, self.ledger, self.invoicing())

    def gateway(self) -> RazorpayGateway | None:
        """The Razorpay gateway when both its keys are set, made once (one connection pool for
        the process, however often a service is built: the scheduler builds one a minute);
        `close_gateway` closes it. Thread-safe: services are built in worker threads too."""
        s = self.settings
        if not (s.razorpay_key_id and s.razorpay_key_secret):
            return None
        with self._gateway_lock:
            if self.gateway_ is None:
                self.gateway_ = RazorpayGateway(
                    key_id=s.razorpay_key_id, key_secret=s.razorpay_key_secret,
                    base_url=s.razorpay_base_url, timeout_s=s.razorpay_timeout_s)
            return self.gateway_

    def close_gateway(self) -> None:
        """Close the gateway's connections, if one was made (a later `gateway()` makes another)."""
        with self._gateway_lock:
            if self.gateway_ is not None:
                self.gateway_.close()
                self.gateway_ = None

    def payments(self) -> PaymentsService:
        """Payments over Razorpay when both its keys are set; without them, orders answer 503
        (payments not configured) and manual payments still work."""
        gateway = self.gateway()
        return PaymentsService(self.ledger, lambda: datetime.now(UTC), gateway,
                               key_secret=self.settings.razorpay_key_secret if gateway else None)

    def notifier(self) -> InvoiceNotifier:
        """Invoice and payment emails: over SMTP_URL, else into the data folder's outbox."""
        s = self.settings
        mailer: Mailer = SmtpMailer(s.smtp_url) if s.smtp_url else OutboxMailer(s.data_dir / "outbox")
        return InvoiceNotifier(self.pool, self.ledger, mailer, self.supplier())

    def credit_notes(self) -> CreditNotesService:
        """Credit notes over the ledger; refunds through Razorpay when its keys are set."""
        return CreditNotesService(self.ledger, lambda: datetime.now(UTC), uuid4, self.gateway(),
                                  pause=_jittered_pause)

    def credit_note_notifier(self) -> CreditNoteNotifier:
        """Credit note emails, through the same mail transport as the invoices'."""
        s = self.settings
        mailer: Mailer = SmtpMailer(s.smtp_url) if s.smtp_url else OutboxMailer(s.data_dir / "outbox")
        return CreditNoteNotifier(self.pool, self.ledger, mailer, self.supplier())

    def supplier(self) -> Supplier:
        """Who issues the invoices, from the settings."""
        s = self.settings
        return Supplier(s.supplier_name, s.supplier_gstin, s.supplier_state_code, s.mail_from)

    def destination_guard(self) -> DestinationGuard:
        """Where tenant webhooks may go (BILLING_WEBHOOKS_ALLOW_PRIVATE lifts the address rule)."""
        return DestinationGuard(allow_private=self.settings.webhooks_allow_private)

    def webhooks(self) -> WebhooksService:
        """Tenant webhook endpoints over the ledger, on the wall clock."""
        return WebhooksService(self.ledger, lambda: datetime.now(UTC), uuid4, new_webhook_secret,
                               self.destination_guard())

    def tenant_webhook_sender(self) -> TenantWebhookSender:
        """The sender of the tenant webhook outbox (run by every worker), on `webhook_clock` if
        set, else the wall clock."""
        return TenantWebhookSender(self.pool, self.destination_guard(),
                                   self.webhook_clock or (lambda: datetime.now(UTC)))


@dataclass(frozen=True)
class ApiRole:
    """The API role of one process: its adapters and the deps the app is built from. Built by
    build_api without I/O; `start()` then does the I/O, and `close()` undoes it."""

    deps: ApiDeps
    admin_token: str
    access: AccessService
    writer: UsageWriter
    rate_limiter: PgRateLimiter
    key_cache: PrefixCache[KeyRecord]
    meter_cache: MeterCache
    token_cache: PrefixCache[TokenRecord]
    tracking_watch: TrackingWatch
    idempotency: PgIdempotencyStore

    async def start(self, stop: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        """Record the bootstrap owner, open the rate limiter's pool and start the usage writer;
        return the caches' refresh loops (they run until `stop`) for the runner to schedule."""
        await asyncio.to_thread(self.access.ensure_bootstrap_owner, self.admin_token)
        await self.rate_limiter.open()
        self.writer.start()
        return [self.key_cache.run(stop), self.meter_cache.run(stop), self.token_cache.run(stop)]

    async def close(self) -> None:
        """Undo start(): close the rate limiter's pool; the writer answers what it holds, then stops."""
        await self.rate_limiter.close()
        await self.writer.stop()


MISSING_SUPPLIER_GSTIN = ("SUPPLIER_GSTIN is not set: invoices are issued without the "
                          "supplier's GSTIN, which a GST tax invoice must show (CGST Rules, rule 46)")


def startup_warnings(settings: Settings) -> tuple[str, ...]:
    """What is configured well enough to run but not to issue proper invoices; logged when the
    API starts and shown by /health/ready (readiness does not fail for them)."""
    return () if settings.supplier_gstin else (MISSING_SUPPLIER_GSTIN,)


def build_api(rt: Runtime, *, admin_token: str) -> ApiRole:
    """Construct the API role over the runtime: no connection opened, nothing written. Logs
    the start-up warnings (startup_warnings)."""
    async def postgres_ok() -> bool:
        def check() -> bool:
            with rt.pool.connection(timeout=READY_PG_TIMEOUT_S) as conn:
                conn.execute("SELECT 1")
            return True

        return await asyncio.to_thread(check)

    async def nats_ok() -> bool:
        if rt.nc is None or not rt.nc.is_connected:
            return False
        await rt.nc.flush(timeout=READY_NATS_TIMEOUT_S)
        return True

    settings = rt.settings
    warnings = startup_warnings(settings)
    for warning in warnings:
        log.warning("%s", warning)
    writer = UsageWriter(rt.database_url, settings.pg_schema)
    tracking = TrackingWatch(rt.pool, rt.ledger)
    key_cache = KeyCache(rt.pool)
    meter_cache = MeterCache(rt.pool)
    token_cache = TokenCache(rt.pool)
    rate_limiter = PgRateLimiter(rt.database_url, settings.pg_schema)
    clock = lambda: datetime.now(UTC)  # noqa: E731
    access_service = AccessService(rt.ledger, clock, uuid4, new_key_secret)
    idempotency_store = PgIdempotencyStore(rt.pool, rt.ledger)
    deps = ApiDeps(
        organisations=OrganisationService(rt.ledger, clock, uuid4),
        catalogue=CatalogueService(rt.ledger, clock, uuid4),
        plans=PlansService(rt.ledger, clock),
        invoicing=rt.invoicing(),
        payments=rt.payments(),
        invoice_runner=rt.invoice_run(),
        render_invoice=partial(render_invoice, rt.pool, rt.supplier()),
        access=access_service,
        tokens=token_cache,
        resolver=PgResolver(rt.pool),
        rate_limiter=rate_limiter,
        role_permissions=ROLE_PERMISSIONS,
        trusted_proxies=[ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies],
        usage=writer,
        keys=key_cache,
        meters=meter_cache,
        clock=clock,
        read_pool=rt.pool,
        gate=PgProjectionGate(rt.pool, rt.ledger),
        tracking=tracking,
        admin_token_sha256=hashlib.sha256(admin_token.encode()).digest(),
        readiness={"postgres": postgres_ok, "nats": nats_ok},
        ops_snapshot=partial(rt.ops_snapshot, writer),
        idempotency=idempotency_store,
        metrics_token_sha256=(hashlib.sha256(settings.metrics_token.encode()).digest()
                              if settings.metrics_token else None),
        webhook_secrets=settings.razorpay_webhook_secrets,
        warnings=warnings,
        credit_notes=rt.credit_notes(),
        render_credit_note=partial(render_credit_note, rt.pool, rt.supplier()),
        webhooks=rt.webhooks(),
        reconcile=partial(_reconcile, rt),
    )
    deps.ledger_page = partial(_ledger_page, rt)
    return ApiRole(deps, admin_token, access_service, writer, rate_limiter, key_cache, meter_cache,
                   token_cache, tracking, idempotency_store)


def _ledger_page(rt: Runtime, after: int, limit: int) -> list[tuple[int, bytes]]:
    """GET /admin/v1/ledger's reads, from the read pool."""
    with rt.pool.connection() as conn:
        return ledger_export_page(conn, rt.settings.pg_schema, after, limit,
                                  events_table=rt.ledger.events_table)


def _reconcile(rt: Runtime, **kwargs: Any) -> Any:
    """infra.reconcile.reconcile (which imports this module: imported when first called)."""
    from infra.reconcile import reconcile

    return reconcile(rt, **kwargs)


def _jittered_pause(attempt: int) -> None:
    """Between numbering retries: a short random wait so racing finalizations spread out."""
    time.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 5)))


def new_key_secret() -> tuple[str, str]:
    """A key's visible prefix and its 256-bit secret part."""
    return secrets.token_hex(PREFIX_CHARS // 2), secrets.token_urlsafe(SECRET_BYTES)


def admin_token(settings: Settings) -> str:
    """The bootstrap owner token: BILLING_ADMIN_TOKEN, or one generated once into the data
    folder (mode 0600) so that `make run` is usable without configuration.

    `serve` starts API children that all call this at once: the token is written whole to a
    temporary file and linked into place (a link fails if the name exists, as O_EXCL did), so
    another process sees the file complete or not at all, and the first link wins. An empty
    token is refused rather than served."""
    token = settings.admin_token
    if token is None:
        path = settings.data_dir / ADMIN_TOKEN_FILE
        if not path.exists():
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(SECRET_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another process won: its token
                    os.link(temp, path)
                    log.warning("BILLING_ADMIN_TOKEN is not set; generated an owner token in %s",
                                path)
            finally:
                temp.unlink(missing_ok=True)
        token = path.read_text().strip()
    if not token:
        raise RuntimeError(f"the admin token is empty ({ADMIN_TOKEN_FILE} in {settings.data_dir}):"
                           " set BILLING_ADMIN_TOKEN, or delete the empty file to generate one")
    return token


WEBHOOK_SECRET_PREFIX = "whsec_"


def new_webhook_secret() -> str:
    """A tenant webhook endpoint's signing secret: 256 bits, recognisable by its prefix."""
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


# ---- reconciliation (issue 18) ---------------------------------------------------------------
# More reconciliation checks, run after checks 1-4 on the same replay (adapters/reconciliation.
# CheckContext -> domain.reconciliation.CheckResult): the credit notes against their invoices
# and their numbering, and check 5, the hash chain recomputed in the replay's snapshot
# (adapters/sealer.verify_chain).
EXTRA_CHECKS: list[ExtraCheck] = [credit_notes_check, chain_check(verify_chain)]

