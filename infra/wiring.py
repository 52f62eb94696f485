"""Wires settings to servers, the ledger, pools, streams, read models and the API's deps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from uuid import uuid4

import psycopg
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from psycopg import sql
from psycopg_pool import ConnectionPool

from adapters import bookkeeping, bus, idempotency, rate_limit
from adapters.caches import KeyCache, MeterCache, PrefixCache, TokenCache
from adapters.gate import PgProjectionGate, TrackingWatch
from adapters.idempotency import PgIdempotencyStore
from adapters.invoice_run import InvoiceRun
from adapters.ledger import LedgerStore
from adapters.mail import OutboxMailer, SmtpMailer
from adapters.maintenance import ensure_tables
from adapters.notifier import InvoiceNotifier, Supplier
from adapters.notifier import render as render_invoice
from adapters.pg import open_pool
from adapters.rate_limit import PgRateLimiter
from adapters.resolver import PgResolver
from adapters.usage_writer import UsageWriter, append_function_ddl
from api.deps import ApiDeps, OpsSnapshot
from api.permissions import ROLE_PERMISSIONS
from domain.api_key import PREFIX_CHARS
from domain.ports import Mailer
from domain.records import KeyRecord, TokenRecord
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from infra.embedded import embedded_servers
from infra.settings import Settings
from projections import access, catalogue, invoices, organisations, plans, usage_totals
from projections.base import ReadModel

log = logging.getLogger("billing.infra")

READ_MODELS: tuple[ReadModel, ...] = (
    organisations.READ_MODEL,
    catalogue.READ_MODEL,
    usage_totals.READ_MODEL,
    plans.READ_MODEL,
    invoices.READ_MODEL,
    access.READ_MODEL,
)
SCHEMA_LOCK_TIMEOUT_S = 30
ADMIN_TOKEN_FILE = "admin-token"
NATS_CLOSE_TIMEOUT_S = 5.0


def read_model(name: str) -> ReadModel:
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
    """Everything a process role needs, built once from Settings."""

    settings: Settings
    database_url: str
    nats_url: str
    ledger: LedgerStore
    pool: ConnectionPool
    streams: bus.Streams
    nc: NatsClient | None = None
    js: JetStreamContext | None = None
    writer: UsageWriter | None = None
    key_cache: PrefixCache[KeyRecord] | None = None
    tracking_watch: TrackingWatch | None = None
    token_cache: PrefixCache[TokenRecord] | None = None
    rate_limiter: PgRateLimiter | None = None
    meter_cache: MeterCache | None = None
    projection_pool_: ConnectionPool | None = None
    extras: dict[str, object] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, database_url: str, nats_url: str) -> Runtime:
        ledger = setup_schema(database_url, settings.pg_schema)
        pool = open_pool(database_url, settings.pg_schema)
        for model in READ_MODELS:
            ensure_tables(pool, model)
        return cls(settings, database_url, nats_url, ledger, pool,
                   bus.Streams(settings.stream_prefix))

    def projection_pool(self) -> ConnectionPool:
        """The projectors' own pool (adapters.pg.open_pool(for_projectors=True)), made once."""
        if self.projection_pool_ is None:
            self.projection_pool_ = open_pool(self.database_url, self.settings.pg_schema,
                                              for_projectors=True)
        return self.projection_pool_

    async def connect_nats(self, name: str) -> JetStreamContext:
        self.nc = await bus.connect(self.nats_url, name)
        self.js = self.nc.jetstream(timeout=bus.REQUEST_TIMEOUT_S)
        await bus.ensure_streams(self.js, self.streams)
        return self.js

    async def close_api(self) -> None:
        """Stop what api_deps() started: the rate limiter's pool and the usage writer."""
        if self.rate_limiter is not None:
            await self.rate_limiter.close()
            self.rate_limiter = None
        if self.writer is not None:
            await self.writer.stop()
            self.writer = None

    async def close(self) -> None:
        await self.close_api()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), NATS_CLOSE_TIMEOUT_S)
        self.pool.close()
        if self.projection_pool_ is not None:
            self.projection_pool_.close()
        self.ledger.close()

    def ops_snapshot(self) -> OpsSnapshot:
        with self.pool.connection() as conn:
            return OpsSnapshot(
                ledger_head=self.ledger.head(),
                ledger_appends=self.ledger.appended_events
                + (self.writer.appended_events if self.writer else 0),
                relay_position=bookkeeping.relay_position(conn),
                projections={m.name: 0 for m in READ_MODELS} | bookkeeping.all_tracking(conn),
                dead_letters=bookkeeping.dead_letter_counts(conn),
                blocked=bookkeeping.blocked_counts(conn),
            )

    def invoicing(self) -> InvoicingService:
        return InvoicingService(self.ledger, lambda: datetime.now(UTC), pause=_jittered_pause)

    def invoice_run(self) -> InvoiceRun:
        return InvoiceRun(self.pool, self.ledger, self.invoicing(), self.settings.supplier_state_code,
                          lambda: datetime.now(UTC), timedelta(hours=self.settings.grace_hours),
                          self.settings.pg_schema)

    def notifier(self) -> InvoiceNotifier:
        s = self.settings
        mailer: Mailer = SmtpMailer(s.smtp_url) if s.smtp_url else OutboxMailer(s.data_dir / "outbox")
        return InvoiceNotifier(self.pool, self.ledger, mailer, self.supplier())

    def supplier(self) -> Supplier:
        s = self.settings
        return Supplier(s.supplier_name, s.supplier_gstin, s.supplier_state_code, s.mail_from)

    def api_deps(self) -> ApiDeps:
        async def postgres_ok() -> bool:
            def check() -> bool:
                with self.pool.connection(timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True

            return await asyncio.to_thread(check)

        async def nats_ok() -> bool:
            if self.nc is None or not self.nc.is_connected:
                return False
            await self.nc.flush(timeout=1)
            return True

        self.writer = UsageWriter(self.database_url, self.settings.pg_schema)
        self.tracking_watch = tracking = TrackingWatch(self.pool, self.ledger)
        self.key_cache = KeyCache(self.pool)
        self.meter_cache = MeterCache(self.pool)
        self.token_cache = TokenCache(self.pool)
        self.rate_limiter = PgRateLimiter(self.database_url, self.settings.pg_schema)
        clock = lambda: datetime.now(UTC)  # noqa: E731
        access_service = AccessService(self.ledger, clock, uuid4, new_key_secret)
        bootstrap = admin_token(self.settings)
        access_service.ensure_bootstrap_owner(bootstrap)
        keys = PgIdempotencyStore(self.pool, self.ledger)
        self.extras["idempotency"] = keys
        return ApiDeps(
            organisations=OrganisationService(self.ledger, clock, uuid4),
            catalogue=CatalogueService(self.ledger, clock, uuid4),
            plans=PlansService(self.ledger, clock),
            invoicing=self.invoicing(),
            invoice_runner=self.invoice_run(),
            render_invoice=partial(render_invoice, self.pool, self.supplier()),
            access=access_service,
            tokens=self.token_cache,
            resolver=PgResolver(self.pool),
            rate_limiter=self.rate_limiter,
            role_permissions=ROLE_PERMISSIONS,
            trusted_proxies=[ipaddress.ip_network(p, strict=False)
                             for p in self.settings.trusted_proxies],
            usage=self.writer,
            keys=self.key_cache,
            meters=self.meter_cache,
            clock=clock,
            read_pool=self.pool,
            gate=PgProjectionGate(self.pool, self.ledger),
            tracking=tracking,
            admin_token_sha256=hashlib.sha256(bootstrap.encode()).digest(),
            readiness={"postgres": postgres_ok, "nats": nats_ok},
            ops_snapshot=self.ops_snapshot,
            idempotency=keys,
            metrics_token_sha256=(hashlib.sha256(self.settings.metrics_token.encode()).digest()
                                  if self.settings.metrics_token else None),
        )


def _jittered_pause(attempt: int) -> None:
    """Between numbering retries: a short random wait so racing finalizations spread out."""
    time.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 5)))


def new_key_secret() -> tuple[str, str]:
    """A key's visible prefix and its 256-bit secret part."""
    return secrets.token_hex(PREFIX_CHARS // 2), secrets.token_urlsafe(32)


def admin_token(settings: Settings) -> str:
    """The bootstrap owner token: BILLING_ADMIN_TOKEN, or one generated once into the data
    folder (mode 0600) so that `make run` is usable without configuration."""
    token = settings.admin_token
    if token is None:
        path = settings.data_dir / ADMIN_TOKEN_FILE
        if not path.exists():
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            log.warning("BILLING_ADMIN_TOKEN is not set; generated an owner token in %s", path)
        token = path.read_text().strip()
    return token
