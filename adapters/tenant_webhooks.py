"""The tenant webhook sender: delivers the outbox (projections/webhook_endpoints.py) over HTTP,
at least once per delivery (docs/WEBHOOKS.md).

The outbox is written from the ledger by the webhook_endpoints projector, once per (endpoint,
tenant event). This sender, in every worker, claims deliveries that are due (FOR UPDATE SKIP
LOCKED, then leased for CLAIM_LEASE_S so that another worker leaves them alone; a crashed
sender's lease runs out and the delivery is claimed again), posts each one's body signed with
its endpoint's secret (`Webhook-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`, and
`Webhook-Id`: the event id, for receivers to drop repeats), at most SEND_CONCURRENCY at once,
each bounded by SEND_TIMEOUT_S, connecting to the address the guard checked (never a second
DNS answer). A 2xx answer delivers it. Anything else (another status, a
timeout, a refused connection, a destination that now resolves to a private address) is
retried after RETRY_FIRST_DELAY_S, doubling up to RETRY_MAX_DELAY_S, until RETRY_WINDOW_S after
its first attempt; then it is dead-lettered (status `dead`), listed, and can be re-sent.

The clock is injected: tests move it instead of sleeping. Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import anyio.to_thread
import httpx
from psycopg_pool import ConnectionPool

from adapters.destinations import RESOLVE_TIMEOUT_S, DestinationGuard
from domain.errors import ValidationFailed
from domain.tenant_webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from projections.webhook_endpoints import DEAD, DELIVERED, PENDING

log = logging.getLogger("billing.tenant_webhooks")

NAME = "tenant_webhook_sender"
SEND_TIMEOUT_S = 10.0  # one POST, connect to answer
SEND_CONCURRENCY = 8  # POSTs at once, per worker
PASS_MAX_DELIVERIES = 64  # claimed per pass
POLL_INTERVAL_S = 0.5  # between passes that found nothing due
# A claimed delivery is left alone this long by other workers: longer than the slowest pass (its
# deliveries wait their turn, SEND_CONCURRENCY at once, each a resolution and a send at most),
# so that two workers never POST the same delivery at the same time.
PASS_WAVES = -(-PASS_MAX_DELIVERIES // SEND_CONCURRENCY)
CLAIM_LEASE_S = PASS_WAVES * (RESOLVE_TIMEOUT_S + SEND_TIMEOUT_S) + 2 * SEND_TIMEOUT_S
RETRY_FIRST_DELAY_S = 30
RETRY_MAX_DELAY_S = 3600
RETRY_WINDOW_S = 24 * 3600  # after the first attempt: then dead-lettered
ERROR_MAX_CHARS = 300
USER_AGENT = "billing-ledger-webhooks/1"

_CLAIM = """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE d.status = %(pending)s AND d.next_attempt_at <= %(now)s AND e.deleted_at IS NULL
    ORDER BY d.next_attempt_at LIMIT %(limit)s FOR UPDATE OF d SKIP LOCKED)
UPDATE webhook_deliveries d SET next_attempt_at = %(lease)s,
    first_attempt_at = coalesce(d.first_attempt_at, %(now)s)
FROM due, webhook_endpoints e WHERE d.id = due.id AND e.id = d.endpoint_id
RETURNING d.id, d.event_id, d.body, d.attempts, d.first_attempt_at, e.url, e.secret
"""


def pinned(url: str, address: str) -> tuple[str, str, str | None]:
    """The URL with its host replaced by the checked `address`, the Host header it keeps, and
    the TLS server name (https: the host name, so its certificate is still checked for it)."""
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host = parts.netloc.rsplit("@", 1)[-1]
    if not host.isascii():  # an internationalised name: the Host header carries its IDNA form
        host = host.encode("idna").decode("ascii")
    sni = parts.hostname if parts.scheme == "https" else None
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host, sni


def retry_delay_s(attempts: int) -> int:
    """The wait after the `attempts`-th failed attempt: 30 s, 60 s, 120 s... at most an hour."""
    return int(min(RETRY_FIRST_DELAY_S * 2 ** min(max(attempts - 1, 0), 30), RETRY_MAX_DELAY_S))


@dataclass(frozen=True)
class Claimed:
    id: UUID
    event_id: UUID
    body: bytes
    attempts: int  # before this one
    first_attempt_at: datetime
    url: str
    secret: str

    def __repr__(self) -> str:  # never the secret, in a log or a traceback
        return f"Claimed(id={self.id}, url={self.url!r}, attempts={self.attempts})"


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass
class PassResult:
    delivered: int = 0
    failed: int = 0
    dead: int = 0


class TenantWebhookSender:
    def __init__(self, pool: ConnectionPool, guard: DestinationGuard,
                 clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._guard = guard
        self._clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        """Send what is due until `stop`; between empty passes, wait POLL_INTERVAL_S."""
        async with self._client() as client:
            while not stop.is_set():
                try:
                    result = await self.send_due(client)
                    busy = result.delivered + result.failed > 0
                except Exception:  # Postgres away, say: try again on the next pass
                    log.exception("tenant webhook pass failed")
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)

    @staticmethod
    def _client() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=SEND_TIMEOUT_S, follow_redirects=False, trust_env=False,
            # No connection is kept: one to an address, opened for one endpoint's host name (its
            # TLS name), must never carry another host's request.
            limits=httpx.Limits(max_connections=SEND_CONCURRENCY, max_keepalive_connections=0),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"})

    async def send_due(self, client: httpx.AsyncClient | None = None) -> PassResult:
        """One pass: claim what is due (at most PASS_MAX_DELIVERIES), send it, record each
        outcome."""
        if client is None:
            async with self._client() as own:
                return await self.send_due(own)
        now = self._clock()
        claimed = await anyio.to_thread.run_sync(self._claim, now)
        result = PassResult()
        if not claimed:
            return result
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(delivery: Claimed) -> None:
            async with gate:
                try:
                    outcome = await self._send(client, delivery)
                except Exception as e:  # none may escape unrecorded: retried like any failure
                    log.exception("tenant webhook %s could not be sent", delivery.id)
                    outcome = Outcome(None, f"{type(e).__name__}: {e}"[:ERROR_MAX_CHARS])
            status = await anyio.to_thread.run_sync(self._record, delivery, outcome)
            if status == DELIVERED:
                result.delivered += 1
            else:
                result.failed += 1
                result.dead += status == DEAD

        await asyncio.gather(*(one(d) for d in claimed))
        return result

    def _claim(self, now: datetime) -> list[Claimed]:
        with self._pool.connection() as conn:
            rows = conn.execute(_CLAIM, {
                "pending": PENDING, "now": now, "limit": PASS_MAX_DELIVERIES,
                "lease": now + timedelta(seconds=CLAIM_LEASE_S)}).fetchall()
        return [Claimed(r[0], r[1], r[2].encode(), r[3], r[4], r[5], r[6]) for r in rows]

    async def _send(self, client: httpx.AsyncClient, delivery: Claimed) -> Outcome:
        try:
            address = await self._guard.check(delivery.url)
        except ValidationFailed as e:
            return Outcome(None, f"refused: {e}"[:ERROR_MAX_CHARS])
        url, host, sni = pinned(delivery.url, address)
        timestamp = int(self._clock().timestamp())
        headers = {SIGNATURE_HEADER: signature_header(delivery.secret, timestamp, delivery.body),
                   EVENT_ID_HEADER: str(delivery.event_id), "Host": host}
        try:
            # httpx's timeout is per phase and per read: a receiver answering a byte at a time
            # could hold a send for ever, past the claim's lease; the send as a whole is bounded.
            async with asyncio.timeout(SEND_TIMEOUT_S), client.stream(
                    "POST", url, content=delivery.body, headers=headers,
                    extensions={"sni_hostname": sni} if sni else None) as response:
                code = response.status_code  # the body is not read: only the status counts
        except httpx.HTTPError as e:
            return Outcome(None, f"{type(e).__name__}: {e}"[:ERROR_MAX_CHARS])
        except TimeoutError:
            return Outcome(None, f"no answer within {SEND_TIMEOUT_S} s")
        return Outcome(code, None if 200 <= code < 300 else f"answered {code}")

    def _record(self, delivery: Claimed, outcome: Outcome) -> str:
        now = self._clock()
        attempts = delivery.attempts + 1
        if outcome.ok:
            status, next_at = DELIVERED, None
        else:
            next_at = now + timedelta(seconds=retry_delay_s(attempts))
            past_window = next_at > delivery.first_attempt_at + timedelta(seconds=RETRY_WINDOW_S)
            status, next_at = (DEAD, None) if past_window else (PENDING, next_at)
            log.warning("tenant webhook %s to %s failed (attempt %d%s): %s", delivery.id,
                        delivery.url, attempts, ", dead-lettered" if status == DEAD else "",
                        outcome.error)
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE webhook_deliveries SET status = %s, attempts = attempts + 1,"
                " next_attempt_at = %s, last_attempt_at = %s, last_status_code = %s,"
                " last_error = %s, delivered_at = %s WHERE id = %s AND status = %s",
                (status, next_at, now, outcome.status_code, outcome.error,
                 now if outcome.ok else None, delivery.id, PENDING))
        return status


