"""What one Postgres primary sustains for ledger appends on this machine (docs/SCALING.md).

The ledger has one serial step: every append takes the library's `LOCK TABLE ... IN EXCLUSIVE
MODE` so that positions commit in order. This bench drives that step alone - the usage writer's
SQL function `billing_append_usage`, through `adapters.usage_writer.UsageWriter` exactly as the
API uses it - with no HTTP, no relay and no projectors, at several batch sizes, and prints it
next to the same run's COPY of the same rows into a table of the ledger's shape (the ceiling of
anything that writes the library's table) and into a table without indexes.

Each phase is bounded in rows and in time; every phase checks that the events table holds
exactly the rows the phase was told were committed.

    python -m bench.ledger_append            # about a minute
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from adapters.usage_writer import UsageWriter
from bench.baseline import copy_rows_per_s, sample_states
from infra.embedded import embedded_servers
from infra.wiring import setup_schema

SCHEMA = "bench_append"
BATCH_SIZES = (1, 10, 100, 1000)
IN_FLIGHT_APPENDS = 64  # concurrent callers waiting on the group commit, as API requests do
PHASE_ROWS_MAX = 300_000
PHASE_S_MAX = 8.0
COPY_ROWS = 200_000
CONNECT_TIMEOUT_S = 10
ID_BYTES = 16


async def _phase(url: str, states: list[bytes], batch: int) -> dict[str, Any]:
    writer = UsageWriter(url, SCHEMA)
    committed = 0
    deadline = time.monotonic() + PHASE_S_MAX

    async def caller(offset: int) -> None:
        nonlocal committed
        i = offset
        while time.monotonic() < deadline and committed < PHASE_ROWS_MAX:
            raw = os.urandom(ID_BYTES * batch)
            ids = [raw[k:k + ID_BYTES] for k in range(0, len(raw), ID_BYTES)]
            rows = [states[(i + k) % len(states)] for k in range(batch)]
            i += batch
            appended = await writer.append_rows(ids, rows)
            committed += appended.accepted

    started = time.perf_counter()
    await asyncio.gather(*(caller(n * 7919) for n in range(IN_FLIGHT_APPENDS)))
    elapsed = time.perf_counter() - started
    await writer.stop()
    return {"batch": batch, "rows": committed, "seconds": round(elapsed, 2),
            "rows_per_s": round(committed / elapsed), "commits": writer.commits}


def _events_rows(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(SCHEMA, table))).fetchone()
        return int(row[0]) if row else 0


def run() -> dict[str, Any]:
    states = sample_states()
    with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp, \
            embedded_servers(Path(tmp), need_pg=True, need_nats=False) as (pg, _):
        assert pg is not None
        url = pg.url
        ledger = setup_schema(url, SCHEMA)
        table = ledger.events_table
        phases = []
        before = 0
        for batch in BATCH_SIZES:
            figures = asyncio.run(_phase(url, states, batch))
            after = _events_rows(url, table)
            assert after - before == figures["rows"], (after - before, figures)
            before = after
            phases.append(figures)
            print(f"append  batch {batch:>5}: {figures['rows_per_s']:>9,} rows/s "
                  f"({figures['rows']:,} rows in {figures['seconds']} s, {figures['commits']:,} commits)",
                  flush=True)
        ledger.close()
        copy_ledger = copy_rows_per_s(url, COPY_ROWS, states, ledger_shape=True)
        copy_plain = copy_rows_per_s(url, COPY_ROWS, states, ledger_shape=False)
    best = max(p["rows_per_s"] for p in phases)
    result = {
        "append": phases, "append_best_rows_per_s": best,
        "copy_ledger_shape_rows_per_s": round(copy_ledger), "copy_plain_rows_per_s": round(copy_plain),
        "append_vs_copy_ledger_shape": round(best / copy_ledger, 3),
        "in_flight_appends": IN_FLIGHT_APPENDS, "cpus": os.cpu_count(),
    }
    print(f"COPY ledger-shaped table: {copy_ledger:,.0f} rows/s; plain table: {copy_plain:,.0f} rows/s")
    return result


def main() -> int:
    print(json.dumps(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
