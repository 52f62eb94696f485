"""Webhook acknowledgement under a burst: 200 signed Razorpay deliveries sent at once to
`POST /webhooks/razorpay` of a running `billing serve`, against the same burst of
`GET /health/live` in the same run (the floor: routing and one tiny answer).

Razorpay counts a delivery not answered 2xx within 5 s as failed, retries it for 24 h, then
disables the webhook: the figure that matters is the p99 time to the 200 under a burst. The
route verifies the signature and records the delivery (one ledger append); applying happens
later in the process manager, whose time until all 200 are applied is printed too.

Each delivery is a `payment.captured` of a payment of no order of ours, so applying it records
the payment and flags it for review (the most work applying can do without an invoice).
Last line: one JSON object. Run: `python -m bench.webhooks`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.ingest import percentile_ms, start_service, stop_service
from domain.gateway_events import PaymentEntity, webhook_body
from infra.embedded import embedded_servers

BURST_DELIVERIES = 200
ROUNDS = 3
WEBHOOK_SECRET = "bench-webhook-secret"
TIMEOUT_S = 30.0
APPLY_DEADLINE_S = 120.0
POLL_S = 0.1


async def _burst(base_url: str, requests: list[tuple[str, str, dict[str, str], bytes | None]],
                 expect: int) -> list[float]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S, limits=limits) as client:
        async def one(method: str, path: str, headers: dict[str, str], body: bytes | None) -> float:
            started = time.perf_counter()
            r = await client.request(method, path, headers=headers, content=body)
            assert r.status_code == expect, r.text
            return time.perf_counter() - started

        return list(await asyncio.gather(*(one(*r) for r in requests)))


def _delivery(round_: int, n: int) -> tuple[str, str, dict[str, str], bytes]:
    body = webhook_body("payment.captured", payment=PaymentEntity(
        f"pay_bench_{round_}_{n}", 10_000 + n, "INR", "captured", f"order_bench_{round_}_{n}",
        "upi", captured=True))
    signature = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return ("POST", "/webhooks/razorpay", {
        "Content-Type": "application/json", "X-Razorpay-Signature": signature,
        "X-Razorpay-Event-Id": f"evt_bench_{round_}_{n}"}, body)


def _flagged(base_url: str, admin: dict[str, str]) -> int:
    """Payments flagged for review, counted through the admin API (pages of 1000)."""
    total, cursor = 0, None
    with httpx.Client(base_url=base_url, headers=admin, timeout=TIMEOUT_S) as client:
        while True:
            params = {"review": "true", "limit": "1000"} | ({"cursor": cursor} if cursor else {})
            page = client.get("/admin/v1/payments", params=params).json()
            total += len(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return total


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="billing-webhook-bench-") as tmp, embedded_servers(
        Path(tmp) / "servers", need_pg=True, need_nats=True
    ) as (pg, nats):
        assert pg is not None and nats is not None
        service = start_service(pg.url, nats.url, Path(tmp) / "service",
                                {"RAZORPAY_WEBHOOK_SECRET": WEBHOOK_SECRET})
        admin = {"Authorization": f"Bearer {service.admin_token}"}
        floor: list[float] = []
        acks: list[float] = []
        applied_s: list[float] = []
        try:
            for round_ in range(ROUNDS):
                floor += asyncio.run(_burst(service.base_url, [
                    ("GET", "/health/live", {}, None)] * BURST_DELIVERIES, 200))
                sent = time.perf_counter()
                acks += asyncio.run(_burst(service.base_url, [
                    _delivery(round_, n) for n in range(BURST_DELIVERIES)], 200))
                deadline = time.monotonic() + APPLY_DEADLINE_S
                while _flagged(service.base_url, admin) < BURST_DELIVERIES * (round_ + 1):
                    assert time.monotonic() < deadline, "deliveries not applied in time"
                    time.sleep(POLL_S)
                applied_s.append(time.perf_counter() - sent)
        finally:
            stop_service(service)
    figures = {
        "deliveries": BURST_DELIVERIES * ROUNDS, "burst": BURST_DELIVERIES,
        "webhook_p50_ms": percentile_ms(acks, 50), "webhook_p99_ms": percentile_ms(acks, 99),
        "webhook_max_ms": round(max(acks) * 1000, 2),
        "health_p50_ms": percentile_ms(floor, 50), "health_p99_ms": percentile_ms(floor, 99),
        "burst_applied_s": [round(s, 2) for s in applied_s],
        "budget_ms": 5000,
    }
    print(f"{'POST /webhooks/razorpay, burst of 200':<42}p50 {figures['webhook_p50_ms']:>8} ms"
          f"   p99 {figures['webhook_p99_ms']:>8} ms   max {figures['webhook_max_ms']} ms")
    print(f"{'GET /health/live, burst of 200 (floor)':<42}p50 {figures['health_p50_ms']:>8} ms"
          f"   p99 {figures['health_p99_ms']:>8} ms")
    print(f"{'burst sent -> all 200 applied':<42}{figures['burst_applied_s']} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
