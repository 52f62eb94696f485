"""Load generators for `bench.ingest`, each in its own (spawned) process, so that the client's CPU
is not charged to the service's interpreter.

- `batch`: blocking `http.client` posters, one keep-alive connection each, sending prebuilt
  `{"events": [...]}` bodies back to back.
- `single`: a closed loop of one-event requests on N keep-alive connections (asyncio and raw
  HTTP/1.1: far less client CPU per request than an HTTP library would take).
- `paced`: an open loop of one-event requests at a fixed rate. It returns every event's send
  time and ledger position (the 202's `X-Ledger-Position`), which the parent matches against the
  usage read model's tracked position; and every k-th position is also read back through
  `GET /api/v1/usage` with that header, which the service answers only once the read model
  includes it (the client's view of send-to-visible).

Every driver reports `max_position`, the highest ledger position its 202s returned. A 202's
position is the last one of the group commit that wrote it, so distinct positions = commits.

`run_workers` starts the processes, lets each one connect, releases them together, and collects
each one's result dict, bounded in time; a process still alive at the end is terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

EVENTS_PATH = "/api/v1/events"
USAGE_PATH = "/api/v1/usage"
COUNT_METRIC = "api_calls"  # aggregation count
SUM_METRIC = "bytes"  # aggregation sum
PROPERTIES = {"endpoint": "/v1/things", "region": "ap-south-1"}
SUM_VALUE_MODULUS = 4096
HTTP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0  # spawn, import, prebuild bodies, connect
GO_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 10.0
RETRIES_MAX = 5  # 429 / 503 / dropped connection, then the request counts as failed
RETRY_SLEEP_MAX_S = 1.0
PACED_START_DELAY_S = 0.05
PACED_POST_CONNECTIONS = 64
PACED_READ_CONNECTIONS = 16
PACED_DRAIN_S = 15.0  # after the last paced send, wait this long for outstanding samples

Result = dict[str, Any]
_encode = msgspec.json.Encoder().encode


# ---- request bodies ---------------------------------------------------------------------------

def sum_value(request: int, index: int) -> int:
    return 1 + (request * 7919 + index) % SUM_VALUE_MODULUS


def batch_body(run: str, request: int, events: int) -> tuple[bytes, int, int]:
    """One `{"events": [...]}` body: even events count `api_calls`, odd ones add to `bytes`.
    Returns (body, number of api_calls events, sum of bytes values)."""
    items: list[dict[str, Any]] = []
    counted = total = 0
    for index in range(events):
        event_id = f"{run}-b{request}-{index}"
        if index % 2 == 0:
            items.append({"event_id": event_id, "metric": COUNT_METRIC, "properties": PROPERTIES})
            counted += 1
        else:
            value = sum_value(request, index)
            items.append({"event_id": event_id, "metric": SUM_METRIC, "value": value,
                          "properties": PROPERTIES})
            total += value
    return _encode({"events": items}), counted, total


def single_body(event_id: str) -> bytes:
    return _encode({"event_id": event_id, "metric": COUNT_METRIC, "properties": PROPERTIES})


def post_request(host: str, port: int, key: str, body: bytes) -> bytes:
    return (
        f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def visible_request(host: str, port: int, key: str, position: bytes) -> bytes:
    return (
        f"GET {USAGE_PATH}?metric={COUNT_METRIC}&granularity=month HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"X-Ledger-Position: {position.decode()}\r\n\r\n"
    ).encode()


# ---- the process harness ----------------------------------------------------------------------

def run_workers(kind: str, params: list[Result], timeout_s: float,
                on_release: Callable[[], None] | None = None) -> list[Result]:
    """Run one `kind` process per params dict; release them together once all are connected
    (calling `on_release` just before). Each result holds `cpu_s`, the process's CPU seconds
    from its release to its end."""
    ctx = mp.get_context("spawn")
    messages: Queue[tuple[str, int, Result | None]] = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=worker, args=(kind, p, i, messages, go), daemon=True,
                         name=f"bench-{kind}-{i}") for i, p in enumerate(params)]
    results: dict[int, Result] = {}

    def receive(deadline: float, what: str) -> tuple[str, int, Result | None]:
        try:
            return messages.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{kind} workers: timed out waiting for {what}") from None

    try:
        for p in procs:
            p.start()
        ready, deadline = 0, time.monotonic() + READY_TIMEOUT_S
        while ready < len(procs):
            tag, index, payload = receive(deadline, "them to connect")
            if tag == "ready":
                ready += 1
            elif payload is not None:
                raise RuntimeError(payload.get("error", f"{kind} worker {index} ended early"))
        if on_release is not None:
            on_release()
        go.set()
        deadline = time.monotonic() + timeout_s
        while len(results) < len(procs):
            tag, index, payload = receive(deadline, "results")
            if tag == "result" and payload is not None:
                results[index] = payload
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(JOIN_TIMEOUT_S)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    return [results[i] for i in range(len(procs))]


def worker(kind: str, params: Result, index: int, messages: Queue[Any], go: Event) -> None:
    def ready() -> None:
        messages.put(("ready", index, None))

    jobs: dict[str, Callable[[Result, Callable[[], None], Callable[[], None]], Result]] = {
        "batch": _batch, "single": _single, "paced": _paced,
    }
    released = [0.0]

    def go_wait() -> None:
        if not go.wait(GO_TIMEOUT_S):
            raise RuntimeError("never released")
        released[0] = time.process_time()

    try:
        result = jobs[kind](params, ready, go_wait)
        result["cpu_s"] = time.process_time() - released[0]
    except BaseException as e:  # reported to the parent, which fails the run
        result = {"error": f"{kind}[{index}]: {type(e).__name__}: {e}"}
    messages.put(("result", index, result))


# ---- batch: blocking posters ------------------------------------------------------------------

def _batch(p: Result, ready: Callable[[], None], go: Callable[[], None]) -> Result:
    bodies = [batch_body(p["run"], r, p["events_per_request"]) for r in p["requests"]]
    headers = {"Authorization": f"Bearer {p['key']}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(p["host"], p["port"], timeout=HTTP_TIMEOUT_S)
    conn.connect()
    ready()
    go()
    deadline = time.monotonic() + p["duration_s"]
    out: Result = {"first_send": None, "last_ack": None, "latencies_s": [], "requests": 0,
                   "accepted": 0, "duplicates": 0, "count_events": 0, "sum_value": 0,
                   "failed_requests": 0, "statuses": {}, "max_position": 0}
    for body, counted, total in bodies:
        started = time.monotonic()
        if started >= deadline:
            break
        if out["first_send"] is None:
            out["first_send"] = started
        status, data, position = _post_with_retries(conn, body, headers, out["statuses"])
        done = time.monotonic()
        out["requests"] += 1
        if status != 202:
            out["failed_requests"] += 1
            continue
        answer = msgspec.json.decode(data)
        out["last_ack"] = done
        out["max_position"] = max(out["max_position"], position)
        out["latencies_s"].append(done - started)
        out["accepted"] += answer["accepted"]
        out["duplicates"] += answer["duplicates"]
        out["count_events"] += counted
        out["sum_value"] += total
    conn.close()
    return out


def _post_with_retries(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str],
                       statuses: dict[str, int]) -> tuple[int, bytes, int]:
    """(status, body, X-Ledger-Position or 0) of the last attempt."""
    status, data, position = 0, b"", 0
    for _ in range(RETRIES_MAX):
        try:
            conn.request("POST", EVENTS_PATH, body, headers)
            response = conn.getresponse()
            data = response.read()
            status = response.status
            position = int(response.getheader("X-Ledger-Position") or 0)
        except (http.client.HTTPException, ConnectionError) as e:
            conn.close()  # http.client reconnects on the next request
            statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status not in (429, 503):
            return status, data, position
        time.sleep(min(float(response.getheader("Retry-After") or 1), RETRY_SLEEP_MAX_S))
    return status, data, position


# ---- raw HTTP/1.1 keep-alive connection for the asyncio drivers ---------------------------------

class RawConnection:
    """One keep-alive connection; reconnects once if the server closed it in between."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        for attempt in range(2):
            try:
                if self.writer is None:
                    await self.open()
                assert self.reader is not None and self.writer is not None
                self.writer.write(request)
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
                if headers.get(b"connection", b"").lower() == b"close":
                    self.close()
                return status, headers, body
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


# ---- single: closed loop at fixed concurrency -------------------------------------------------

def _single(p: Result, ready: Callable[[], None], go: Callable[[], None]) -> Result:
    return asyncio.run(_single_async(p, ready, go))


async def _single_async(p: Result, ready: Callable[[], None], go: Callable[[], None]) -> Result:
    host, port, key = p["host"], p["port"], p["key"]
    conns = [RawConnection(host, port) for _ in range(p["connections"])]
    for c in conns:
        await c.open()
    ready()
    await asyncio.to_thread(go)
    counter = itertools.count()
    budget = p["requests_max"]
    prefix = f"{p['run']}-s{p['worker']}-"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    positions: set[int] = set()
    started = time.monotonic()
    deadline = started + p["duration_s"]

    async def drive(c: RawConnection) -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= budget:
                return
            request = post_request(host, port, key, single_body(f"{prefix}{i}"))
            sent = time.monotonic()
            try:
                status, headers, _ = await c.exchange(request)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 202:
                latencies.append(time.monotonic() - sent)
                positions.add(int(headers.get(b"x-ledger-position", b"0")))

    await asyncio.gather(*(drive(c) for c in conns))
    ended = time.monotonic()
    for c in conns:
        c.close()
    return {"first_send": started, "last_ack": ended, "latencies_s": latencies,
            "ok": len(latencies), "statuses": statuses, "positions": sorted(positions),
            "max_position": max(positions, default=0)}


# ---- paced: open loop at a fixed rate, sampling send → visible ---------------------------------

def _paced(p: Result, ready: Callable[[], None], go: Callable[[], None]) -> Result:
    return asyncio.run(_paced_async(p, ready, go))


async def _paced_async(p: Result, ready: Callable[[], None], go: Callable[[], None]) -> Result:
    host, port, key = p["host"], p["port"], p["key"]
    rate, sample_every = float(p["rate_per_s"]), int(p["sample_every"])
    total = int(rate * p["duration_s"])
    posts: asyncio.Queue[RawConnection] = asyncio.Queue()
    reads: asyncio.Queue[RawConnection] = asyncio.Queue()
    for pool, size in ((posts, PACED_POST_CONNECTIONS), (reads, PACED_READ_CONNECTIONS)):
        for _ in range(size):
            c = RawConnection(host, port)
            await c.open()
            pool.put_nowait(c)
    ready()
    await asyncio.to_thread(go)
    acks: list[float] = []
    api_lags: list[float] = []
    slips: list[float] = []
    statuses: dict[str, int] = {}
    visible_statuses: dict[str, int] = {}
    sends: list[float] = []
    events: list[tuple[float, int]] = []  # (sent, ledger position) of every 202

    async def one(i: int, due: float) -> None:
        request = post_request(host, port, key, single_body(f"{p['run']}-p{i}"))
        c = await posts.get()
        try:
            sent = time.monotonic()
            sends.append(sent)
            status, headers, _ = await c.exchange(request)
            acked = time.monotonic()
        finally:
            posts.put_nowait(c)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status != 202:
            return
        acks.append(acked - sent)
        slips.append(sent - due)
        position = headers.get(b"x-ledger-position", b"0")
        events.append((sent, int(position)))
        if i % sample_every:
            return
        r = await reads.get()
        try:
            status, _, _ = await r.exchange(visible_request(host, port, key, position))
        finally:
            reads.put_nowait(r)
        visible_statuses[str(status)] = visible_statuses.get(str(status), 0) + 1
        if status == 200:
            api_lags.append(time.monotonic() - sent)

    start = time.monotonic() + PACED_START_DELAY_S
    tasks: list[asyncio.Task[None]] = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    failures = 0
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=PACED_DRAIN_S)
        for t in pending:
            t.cancel()
        failures = len(pending) + sum(1 for t in done if t.exception() is not None)
    while not posts.empty():
        posts.get_nowait().close()
    while not reads.empty():
        reads.get_nowait().close()
    with contextlib.suppress(ValueError):
        return {"first_send": min(sends), "last_send": max(sends), "sent": len(sends),
                "ok": len(acks), "acks_s": acks, "api_lags_s": api_lags, "slips_s": slips,
                "events": events, "statuses": statuses, "visible_statuses": visible_statuses,
                "failures": failures, "sample_every": sample_every,
                "max_position": max((p for _, p in events), default=0)}
    return {"error": "paced: nothing was sent"}
