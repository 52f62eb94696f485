"""Auth overhead per request: key lookup (per-process cache) + IP allow-lists + the shared rate
limit, measured against a route with no auth, in the same run on the same service.

- `no_auth`: GET /health/live — routing, request id middleware, a tiny JSON answer.
- `auth`: POST /api/v1/events with a valid key (organisation and key allow-lists set, rate
  limit lifted) and the body `[]`: authorise_key runs in full, then the body is refused (422)
  before any ledger work. The difference is the auth overhead (plus reading a 2-byte body and
  a slightly larger problem+json answer: an upper bound).

Requests alternate between the two in blocks on one keep-alive connection, so a noisy
machine affects both alike. Last line: one JSON object. Run: `python -m bench.auth`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.ingest import HOST, setup_tenant, start_service, stop_service
from infra.embedded import embedded_servers

BLOCKS = 20
REQUESTS_PER_BLOCK = 250
TIMEOUT_S = 10.0


def _block(client: httpx.Client, method: str, path: str, headers: dict[str, str], body: bytes | None,
           expect: int) -> float:
    started = time.perf_counter()
    for _ in range(REQUESTS_PER_BLOCK):
        r = client.request(method, path, headers=headers, content=body)
        assert r.status_code == expect, r.text
    return (time.perf_counter() - started) / REQUESTS_PER_BLOCK


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="billing-auth-bench-") as tmp, embedded_servers(
        Path(tmp) / "servers", need_pg=True, need_nats=True
    ) as (pg, nats):
        assert pg is not None and nats is not None
        service = start_service(pg.url, nats.url, Path(tmp) / "service")
        try:
            tenant = setup_tenant(service)
            admin = {"Authorization": f"Bearer {service.admin_token}"}
            r = httpx.patch(f"{service.base_url}/admin/v1/organisations/{tenant.org_id}", headers=admin,
                            json={"allowed_ips": [f"{HOST}/32", "10.0.0.0/8", "::1/128"]})
            assert r.status_code == 200, r.text
            key_headers = {"Authorization": f"Bearer {tenant.key}"}
            with httpx.Client(base_url=service.base_url, timeout=TIMEOUT_S) as client:
                deadline = time.monotonic() + TIMEOUT_S  # wait until the key cache has the list
                while client.post("/api/v1/events", headers=key_headers, content=b"[]").status_code != 422:
                    assert time.monotonic() < deadline
                no_auth, auth = [], []
                for _ in range(BLOCKS):
                    no_auth.append(_block(client, "GET", "/health/live", {}, None, 200))
                    auth.append(_block(client, "POST", "/api/v1/events", key_headers, b"[]", 422))
        finally:
            stop_service(service)
    base, with_auth = statistics.median(no_auth), statistics.median(auth)
    figures = {
        "no_auth_us": round(base * 1e6, 1), "auth_us": round(with_auth * 1e6, 1),
        "auth_overhead_us": round((with_auth - base) * 1e6, 1),
        "requests": 2 * BLOCKS * REQUESTS_PER_BLOCK,
    }
    print(f"{'GET /health/live (no auth)':<40}{figures['no_auth_us']:>10} µs/request")
    print(f"{'POST /api/v1/events, key + IP + rate':<40}{figures['auth_us']:>10} µs/request")
    print(f"{'auth overhead (upper bound)':<40}{figures['auth_overhead_us']:>10} µs/request")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
