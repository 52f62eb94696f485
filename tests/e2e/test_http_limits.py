"""Limits on what a request's head may cost the server, before any authentication: the request
line and the headers are capped (431 / 414, as production HTTP servers do), so that one client
cannot grow the API's memory by sending a huge header."""

from __future__ import annotations

import asyncio
import json

import pytest

from infra.http_protocol import HEAD_MAX_BYTES, HEADER_MAX_BYTES, URL_MAX_BYTES
from tests.e2e.conftest import Api

pytestmark = pytest.mark.anyio

CHUNK_BYTES = 256 * 1024
BIG_HEADER_BYTES = 64 * 1024 * 1024  # the probe's 64 MB header
READ_TIMEOUT_S = 10.0


async def _exchange(api: Api, head: bytes, filler_bytes: int = 0) -> tuple[int, bytes]:
    """Send a request head (then `filler_bytes` more header value, in chunks, for as long as the
    server reads them) and return the response's status and body."""
    port = int(str(api.http.base_url).rsplit(":", 1)[1].rstrip("/"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        sent = 0
        try:
            while sent < filler_bytes:
                writer.write(b"a" * CHUNK_BYTES)
                await writer.drain()
                sent += CHUNK_BYTES
            if filler_bytes:
                writer.write(b"\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed while we were still sending
        raw = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_64_mb_header_on_an_open_route_gets_431_without_being_read_whole(api: Api) -> None:
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: "
    status, body = await _exchange(api, head, BIG_HEADER_BYTES)
    assert status == 431
    problem = json.loads(body)
    assert problem["status"] == 431 and "header" in problem["detail"]


async def test_one_header_over_its_limit_gets_431(api: Api) -> None:
    value = b"v" * (HEADER_MAX_BYTES + 1)
    status, _ = await _exchange(api, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-One: " + value
                                + b"\r\nConnection: close\r\n\r\n")
    assert status == 431


async def test_many_headers_over_the_total_get_431_each_within_its_own_limit(api: Api) -> None:
    line = b"X-H%d: " + b"v" * (HEADER_MAX_BYTES // 2) + b"\r\n"
    count = HEAD_MAX_BYTES // (HEADER_MAX_BYTES // 2) + 1
    headers = b"".join(line.replace(b"%d", str(i).encode()) for i in range(count))
    status, _ = await _exchange(api, b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + headers
                                + b"Connection: close\r\n\r\n")
    assert status == 431


async def test_a_request_line_over_its_limit_gets_414(api: Api) -> None:
    path = b"/health/live?" + b"q" * URL_MAX_BYTES
    status, _ = await _exchange(api, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 414


async def test_headers_within_the_limits_are_served(api: Api) -> None:
    value = b"v" * (HEADER_MAX_BYTES - 100)
    status, _ = await _exchange(api, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-One: " + value
                                + b"\r\nConnection: close\r\n\r\n")
    assert status == 200
