"""Settings, read from the environment once (README.md's table) and passed down explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = "./.data"
DEFAULT_SUPPLIER_STATE_CODE = "29"
DEFAULT_API_PROCESSES = 1
API_PROCESSES_MAX = 16
DEFAULT_RAZORPAY_TIMEOUT_S = 10.0
RAZORPAY_TIMEOUT_MAX_S = 120.0  # a request to the API waits on the gateway at most this long
STREAM_REPLICAS_MAX = 5  # JetStream's own bound on a stream's replicas
# An invoice run of thousands of organisations drafts batches in this many more processes
# (each about a core; docs/SCALING.md, The invoice run). 0: the run alone.
DEFAULT_INVOICE_RUN_HELPERS = 1
INVOICE_RUN_HELPERS_MAX = 8


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    data_dir: Path
    database_url: str | None
    nats_url: str | None
    admin_token: str | None
    smtp_url: str | None
    razorpay_key_id: str | None
    razorpay_key_secret: str | None
    # Every secret a webhook signature may be made with: more than one during a rotation.
    razorpay_webhook_secrets: tuple[str, ...]
    razorpay_base_url: str | None
    supplier_state_code: str
    supplier_gstin: str | None
    log_level: str = "INFO"
    trusted_proxies: tuple[str, ...] = ()
    grace_hours: int = 24
    auto_finalize_hours: int = 24  # 0: drafts wait for POST .../finalize
    supplier_name: str = "Billing Platform"
    mail_from: str = "billing@localhost"
    api_processes: int = DEFAULT_API_PROCESSES  # `serve`: HTTP processes sharing the port
    # /metrics: a bearer token for the scraper; None = answer clients on this host only.
    metrics_token: str | None = None
    # Isolation knobs: tests give every test its own schema and stream names.
    pg_schema: str = "public"
    stream_prefix: str = ""
    razorpay_timeout_s: float = DEFAULT_RAZORPAY_TIMEOUT_S  # each call to Razorpay, at most
    # JetStream placement of the streams: R3 on a 3-node cluster (infra/deploy/), 1 on one server.
    stream_replicas: int = 1
    stream_placement_tags: tuple[str, ...] = ()
    # Tenant webhooks may go to loopback/private/link-local addresses (docs/WEBHOOKS.md): off.
    webhooks_allow_private: bool = False
    # The archive (docs/AUDIT.md): s3://bucket/prefix, or None for <data folder>/archive.
    archive_url: str | None = None
    archive_endpoint_url: str | None = None  # an S3-compatible service other than AWS
    # Processes that draft batches of a large invoice run besides the one running it.
    invoice_run_helpers: int = DEFAULT_INVOICE_RUN_HELPERS


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"PORT must be 1..65535, got {value}")
    return port


def _api_processes(value: str) -> int:
    count = int(value)
    if not 1 <= count <= API_PROCESSES_MAX:
        raise ValueError(f"BILLING_API_PROCESSES must be 1..{API_PROCESSES_MAX}, got {value}")
    return count


def _timeout_s(name: str, value: str) -> float:
    timeout_s = float(value)
    if not 0 < timeout_s <= RAZORPAY_TIMEOUT_MAX_S:
        raise ValueError(f"{name} must be more than 0 and at most {RAZORPAY_TIMEOUT_MAX_S:g} "
                         f"seconds, got {value}")
    return timeout_s


def _stream_replicas(value: str) -> int:
    replicas = int(value)
    if not 1 <= replicas <= STREAM_REPLICAS_MAX:
        raise ValueError(f"BILLING_STREAM_REPLICAS must be 1..{STREAM_REPLICAS_MAX}, got {value}")
    return replicas


def _invoice_run_helpers(value: str | None) -> int:
    """BILLING_INVOICE_RUN_HELPERS: unset is DEFAULT_INVOICE_RUN_HELPERS."""
    if value is None:
        return DEFAULT_INVOICE_RUN_HELPERS
    count = int(value)
    if not 0 <= count <= INVOICE_RUN_HELPERS_MAX:
        raise ValueError(f"BILLING_INVOICE_RUN_HELPERS must be 0..{INVOICE_RUN_HELPERS_MAX}, "
                         f"got {value}")
    return count


def _comma_list(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: the process environment). The only env reader."""
    e = os.environ if env is None else env

    def opt(name: str) -> str | None:
        value = e.get(name, "").strip()
        return value or None

    return Settings(
        host=opt("HOST") or DEFAULT_HOST,
        port=_port(opt("PORT") or str(DEFAULT_PORT)),
        data_dir=Path(opt("BILLING_DATA_DIR") or DEFAULT_DATA_DIR).resolve(),
        database_url=opt("DATABASE_URL"),
        nats_url=opt("NATS_URL"),
        admin_token=opt("BILLING_ADMIN_TOKEN"),
        smtp_url=opt("SMTP_URL"),
        razorpay_key_id=opt("RAZORPAY_KEY_ID"),
        razorpay_key_secret=opt("RAZORPAY_KEY_SECRET"),
        razorpay_webhook_secrets=_comma_list(opt("RAZORPAY_WEBHOOK_SECRET")),
        razorpay_base_url=opt("RAZORPAY_BASE_URL"),
        supplier_state_code=opt("SUPPLIER_STATE_CODE") or DEFAULT_SUPPLIER_STATE_CODE,
        supplier_gstin=opt("SUPPLIER_GSTIN"),
        log_level=(opt("LOG_LEVEL") or "INFO").upper(),
        pg_schema=opt("BILLING_PG_SCHEMA") or "public",
        grace_hours=int(opt("BILLING_GRACE_HOURS") or "24"),
        auto_finalize_hours=int(opt("BILLING_AUTO_FINALIZE_HOURS") or "24"),
        supplier_name=opt("SUPPLIER_NAME") or "Billing Platform",
        mail_from=opt("BILLING_MAIL_FROM") or "billing@localhost",
        stream_prefix=opt("BILLING_STREAM_PREFIX") or "",
        metrics_token=opt("BILLING_METRICS_TOKEN"),
        api_processes=_api_processes(opt("BILLING_API_PROCESSES") or str(DEFAULT_API_PROCESSES)),
        trusted_proxies=_comma_list(opt("BILLING_TRUSTED_PROXIES")),
        razorpay_timeout_s=_timeout_s("RAZORPAY_TIMEOUT_S",
                                      opt("RAZORPAY_TIMEOUT_S") or str(DEFAULT_RAZORPAY_TIMEOUT_S)),
        stream_replicas=_stream_replicas(opt("BILLING_STREAM_REPLICAS") or "1"),
        stream_placement_tags=_comma_list(opt("BILLING_STREAM_PLACEMENT_TAGS")),
        webhooks_allow_private=_flag("BILLING_WEBHOOKS_ALLOW_PRIVATE",
                                     opt("BILLING_WEBHOOKS_ALLOW_PRIVATE")),
        archive_url=opt("BILLING_ARCHIVE_URL"),
        archive_endpoint_url=opt("BILLING_ARCHIVE_ENDPOINT_URL"),
        invoice_run_helpers=_invoice_run_helpers(opt("BILLING_INVOICE_RUN_HELPERS")),
    )


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, value: str | None) -> bool:
    """An on/off setting: unset is off; anything but 1/true/yes/on or 0/false/no/off is refused."""
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value}")
