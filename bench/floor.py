"""The floor under `bench.ingest`'s batch figure on this machine: the same 1000-event load
against a minimal pipeline with none of the service's guarantees, next to the same COPY baseline.

The issue's targets are ratios to a raw COPY, calibrated on another machine ("a minimal pipeline
with none of our guarantees measured 0.33 here"). How much of a pipeline's cost is Python over
HTTP depends on the machine, so this bench measures that minimal pipeline here, in one run:

- `plain`: uvicorn (httptools, uvloop, one process, as the service runs) with a bare ASGI app
  that decodes each body with msgspec into typed events, encodes each event as msgpack, COPYs
  the rows (random uuid, state) into a plain table over a pool of connections, and answers 202
  after the commit. No auth, no rate limit, no idempotency, no total order, no relay, no NATS,
  no read model: "visible" is the 202 itself.
- `lean`: `plain` without its per-event objects (the decoded events encoded as they are, the ids
  cut from one `os.urandom` and sent as their 16-byte binary form): what the same pipeline gets
  once its obvious per-event costs are gone.
- `ledger`: `plain`, but into a table shaped like the library's events table (random-looking
  uuid5 primary key and notification id) with the identity derived from (project, event_id)
  and duplicates skipped: the one guarantee that costs Postgres the most.

Each pipeline gets a fresh table, three warm-up batches and then the batch load of
`bench.ingest` (its load processes and bodies). Every phase checks that the table holds exactly
the accepted events. The COPY baseline is the median of three runs before and three after;
every phase and every COPY starts right after a CHECKPOINT, as in `bench.ingest`.

It prints a table and, last, one JSON object with `<pipeline>_vs_copy` for each: `lean_vs_copy`
is a practical ceiling for `bench.ingest`'s `batch_vs_copy` on this machine, since the service
does all of `lean`'s work per event and more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg
from psycopg import sql

from bench import baseline
from bench.ingest import HOST, CpuMeter, copy_runs, log, machine, postmaster_pid
from bench.load import run_workers
from infra.embedded import embedded_servers, free_port

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from multiprocessing.queues import Queue

    Message = dict[str, Any]
    Scope = dict[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]

EVENTS_PER_REQUEST = 1000  # as bench.ingest
EVENTS_MAX = 200_000  # per pipeline, as bench.ingest's batch phase
LOAD_CONNECTIONS = 4  # as bench.ingest's BATCH_CONNECTIONS
LOAD_DURATION_S = 60.0
LOAD_TIMEOUT_S = 120.0
WARMUP_BATCHES = 3
POOL_SIZE = 4  # Postgres connections of the minimal server, one per load connection
BODY_MAX_BYTES = 1 << 20
SERVER_READY_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10
TOPIC = "bench.floor:UsageRecorded"
PIPELINES = ("plain", "lean", "ledger")



class FloorEvent(msgspec.Struct, forbid_unknown_fields=True):
    event_id: str
    metric: str
    value: int | str | None = None
    timestamp: str | None = None
    properties: dict[str, str] = {}


class FloorBody(msgspec.Struct, forbid_unknown_fields=True):
    events: list[FloorEvent]


class FloorState(msgspec.Struct):
    """What the minimal pipeline stores per event: the event and its receipt time."""

    event_id: str
    metric: str
    value: int | str | None
    properties: dict[str, str]
    received_at: str


# ---- the minimal server (runs in its own spawned process) ------------------------------------

class FloorApp:
    """Bare ASGI: POST a batch, get 202 after its COPY commits; anything else is 404/400."""

    def __init__(self, database_url: str, pipeline: str) -> None:
        from psycopg_pool import AsyncConnectionPool  # imported in the server process only

        self.pipeline = pipeline
        self.table = table_of(pipeline)
        self.pool = AsyncConnectionPool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                        open=False, kwargs={"autocommit": True})
        self.decode = msgspec.json.Decoder(FloorBody).decode
        self.encode_state = msgspec.msgpack.Encoder().encode
        self.encode_json = msgspec.json.Encoder().encode
        self.project = uuid.uuid4()  # the namespace of this run's event identities

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._answer(send, 404, b"{}")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > BODY_MAX_BYTES:
                await self._answer(send, 413, b"{}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            body = self.decode(b"".join(chunks))
        except msgspec.ValidationError as e:
            await self._answer(send, 400, self.encode_json({"error": str(e)}))
            return
        accepted = await self._store(body.events)
        await self._answer(send, 202, self.encode_json(
            {"accepted": accepted, "duplicates": len(body.events) - accepted}))

    async def _store(self, events: list[FloorEvent]) -> int:
        if self.pipeline == "lean":
            return await self._store_lean(events)
        now = datetime.now(UTC).isoformat()
        states = [self.encode_state(FloorState(e.event_id, e.metric, e.value, e.properties, now))
                  for e in events]
        if self.pipeline == "plain":
            ids = [uuid.uuid4() for _ in events]
            async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                statement = sql.SQL("COPY {} (originator_id, originator_version, topic, state)"
                                    " FROM STDIN (FORMAT BINARY)").format(self.table)
                async with cur.copy(statement) as copy:
                    copy.set_types(["uuid", "int8", "text", "bytea"])
                    for ident, state in zip(ids, states, strict=True):
                        await copy.write_row((ident, 1, TOPIC, state))
            return len(events)
        ids = [uuid.uuid5(self.project, e.event_id) for e in events]
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state)"
                " SELECT i, 1, %s, s FROM unnest(%s::uuid[], %s::bytea[]) AS r(i, s)"
                " ON CONFLICT DO NOTHING").format(self.table), (TOPIC, ids, states))
            return cur.rowcount

    async def _store_lean(self, events: list[FloorEvent]) -> int:
        """`plain` without its per-event objects: the decoded events encoded as they are, the
        ids cut from one urandom call and sent as their 16-byte binary form."""
        states = [self.encode_state(e) for e in events]
        ids = os.urandom(16 * len(states))
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            statement = sql.SQL("COPY {} (originator_id, originator_version, topic, state)"
                                " FROM STDIN (FORMAT BINARY)").format(self.table)
            async with cur.copy(statement) as copy:
                copy.set_types(["bytea", "int8", "text", "bytea"])  # a uuid's binary form: 16 bytes
                for at, state in enumerate(states):
                    await copy.write_row((ids[16 * at:16 * at + 16], 1, TOPIC, state))
        return len(states)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve(database_url: str, pipeline: str, port: int, ready: Queue[int]) -> None:
    """The server process: uvicorn as the service runs it (httptools, uvloop, one process)."""
    import uvicorn

    config = uvicorn.Config(FloorApp(database_url, pipeline), host=HOST, port=port, loop="uvloop",
                            http="httptools", lifespan="on", log_level="warning",
                            access_log=False, server_header=False, date_header=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while not server.started and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ready.put(os.getpid() if server.started else -1)
        await task

    asyncio.run(main())


# ---- the bench ---------------------------------------------------------------------------------

@dataclass
class Server:
    proc: mp.process.BaseProcess
    port: int


def start_server(database_url: str, pipeline: str) -> Server:
    ctx = mp.get_context("spawn")
    ready: Queue[int] = ctx.Queue()
    port = free_port(HOST)
    proc = ctx.Process(target=serve, args=(database_url, pipeline, port, ready),
                       name=f"floor-{pipeline}", daemon=True)
    proc.start()
    server = Server(proc, port)
    try:
        started = ready.get(timeout=SERVER_READY_TIMEOUT_S) > 0
    except queue.Empty:
        started = False
    if not started:
        stop_server(server)
        raise RuntimeError(f"the {pipeline} floor server did not start in {SERVER_READY_TIMEOUT_S} s")
    return server


def stop_server(server: Server) -> None:
    server.proc.terminate()  # SIGTERM: uvicorn shuts down, the lifespan closes the pool
    server.proc.join(SERVER_STOP_TIMEOUT_S)
    if server.proc.is_alive():
        server.proc.kill()
        server.proc.join(SERVER_STOP_TIMEOUT_S)


def table_of(pipeline: str) -> sql.Identifier:
    return sql.Identifier(baseline.SCHEMA, "floor_" + pipeline)


def stored(database_url: str, pipeline: str) -> int:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_of(pipeline))).fetchone()
    assert row is not None
    return int(row[0])


def pipeline_phase(database_url: str, postgres_pid: int | None, pipeline: str, run: str,
                   events_max: int) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        baseline.fresh_table(conn, "floor_" + pipeline, ledger_shape=pipeline == "ledger")
    server = start_server(database_url, pipeline)
    try:
        base = {"host": HOST, "port": server.port, "key": "unused", "run": f"{run}-{pipeline}",
                "events_per_request": EVENTS_PER_REQUEST, "duration_s": LOAD_DURATION_S}
        warm = run_workers("batch", [base | {"run": f"{run}-{pipeline}-warm",
                                             "requests": list(range(WARMUP_BATCHES))}], LOAD_TIMEOUT_S)
        requests = max(LOAD_CONNECTIONS, events_max // EVENTS_PER_REQUEST)
        params = [base | {"requests": list(range(w, requests, LOAD_CONNECTIONS))}
                  for w in range(LOAD_CONNECTIONS)]
        log(f"{pipeline}: {requests} x {EVENTS_PER_REQUEST} events over {LOAD_CONNECTIONS} connections")
        assert server.proc.pid is not None
        meter = CpuMeter(server.proc.pid, postgres_pid, None)
        baseline.checkpoint(database_url)  # as bench.ingest: no checkpoint inside a phase
        cpu0 = meter.snapshot()
        results = run_workers("batch", params, LOAD_TIMEOUT_S)
        cpu1 = meter.snapshot()
    finally:
        stop_server(server)
    accepted = sum(r["accepted"] for r in results)
    failed = sum(r["failed_requests"] for r in results)
    wall = max(r["last_ack"] for r in results) - min(r["first_send"] for r in results)
    in_table = stored(database_url, pipeline) - sum(r["accepted"] for r in warm)
    if failed or in_table != accepted:
        raise RuntimeError(f"{pipeline}: {failed} requests failed; {accepted} accepted, {in_table} stored")
    latencies = sorted(x for r in results for x in r["latencies_s"])
    used = {k: cpu1[k] - cpu0[k] for k in ("service_s", "postgres_s")}
    return {
        f"{pipeline}_events": accepted,
        f"{pipeline}_events_per_s": round(accepted / wall, 1),
        f"{pipeline}_request_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        f"{pipeline}_server_cpu_us_per_event": round(1e6 * used["service_s"] / accepted, 2),
        f"{pipeline}_postgres_cpu_us_per_event": round(1e6 * used["postgres_s"] / accepted, 2),
        f"{pipeline}_load_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        f"{pipeline}_wall_s": round(wall, 2),
    }


def run(scale: float) -> dict[str, Any]:
    started = time.monotonic()
    figures: dict[str, Any] = {"scale": scale} | machine()
    tmp = Path(tempfile.mkdtemp(prefix="billing-floor-"))
    tmp.chmod(0o755)  # the embedded Postgres may run as its own system user
    events_max = max(LOAD_CONNECTIONS * EVENTS_PER_REQUEST, int(EVENTS_MAX * scale))
    try:
        log(f"starting embedded Postgres (fsync on) under {tmp}")
        with embedded_servers(tmp / "servers", need_pg=True, need_nats=False, fsync=True) as (pg, _):
            assert pg is not None
            states = baseline.sample_states()
            before = copy_runs(pg.url, events_max, states, "before the pipelines")
            run_id = uuid.uuid4().hex[:8]
            for pipeline in PIPELINES:
                figures |= pipeline_phase(pg.url, postmaster_pid(pg), pipeline, run_id, events_max)
            after = copy_runs(pg.url, events_max, states, "after the pipelines")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copy_plain = statistics.median(before[0] + after[0])
    copy_shape = statistics.median(before[1] + after[1])
    figures |= {
        "copy_rows_per_s": round(copy_plain, 1),
        "copy_rows_per_s_runs": [round(r) for r in before[0] + after[0]],
        "copy_ledger_shape_rows_per_s": round(copy_shape, 1),
    }
    figures |= {f"{p}_vs_copy": round(figures[f"{p}_events_per_s"] / copy_plain, 3) for p in PIPELINES}
    figures |= {
        "runtime_s": round(time.monotonic() - started, 1),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return figures


ROWS = (
    ("plain_events_per_s", "events/s, HTTP -> decode -> COPY into a plain table -> 202"),
    ("plain_server_cpu_us_per_event", "µs of server CPU an event"),
    ("plain_postgres_cpu_us_per_event", "µs of Postgres CPU an event"),
    ("lean_events_per_s", "events/s, the same without per-event objects"),
    ("lean_server_cpu_us_per_event", "µs of server CPU an event"),
    ("lean_postgres_cpu_us_per_event", "µs of Postgres CPU an event"),
    ("ledger_events_per_s", "events/s, plain into the ledger's shape, uuid5, duplicates skipped"),
    ("ledger_server_cpu_us_per_event", "µs of server CPU an event"),
    ("ledger_postgres_cpu_us_per_event", "µs of Postgres CPU an event"),
    ("copy_rows_per_s", "rows/s, binary COPY, plain table (median of 6)"),
    ("plain_vs_copy", "plain pipeline / COPY"),
    ("lean_vs_copy", "lean pipeline / COPY: about the ceiling for batch_vs_copy here"),
    ("ledger_vs_copy", "ledger-shaped pipeline / COPY"),
)


def print_table(figures: dict[str, Any]) -> None:
    print(f"{'figure':34s} {'value':>12s}  meaning")
    print("-" * 100)
    for name, meaning in ROWS:
        value = figures[name]
        shown = f"{value:,.3f}" if isinstance(value, float) and value < 10 else f"{value:,.1f}"
        print(f"{name:34s} {shown:>12s}  {meaning}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the event count (e.g. 0.1 for a smoke run)")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    figures = run(args.scale)
    print_table(figures)
    print(json.dumps(figures, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
