"""Sealer benchmark: `python -m bench.sealer` (issue 18: the sealer keeps up with ingestion).

One run on embedded Postgres (fsync on) in a temporary folder, no HTTP:

1. ingestion: INGEST_TASKS tasks append 1000-event usage batches through the service's own
   UsageWriter (the group-commit path every accepted batch takes, without HTTP in front: an
   upper bound of the API's batch rate, which bench/ingest.py measures at ~60k events/s here)
   while the sealer (adapters/sealer.Sealer, as the `seal` role runs it) seals live beside it
   in the same process. Reported: ingestion events/s, how far behind the sealer was when
   ingestion ended (entries), and how long it took to seal the rest;
2. backlog: the seals are dropped and the same ledger is sealed again from position 0 in
   blocks of SEAL_BLOCK_MAX_ENTRIES: the sealer's own maximum rate, events/s. With
   `--total-events N` the ledger is first grown to N entries by Postgres (copies of the
   ingested usage events under new ids, INSERT ... SELECT: no HTTP, no writer), so that the
   backlog and verify figures are for a ledger of that size (e.g. 5M) while ingestion is
   measured on `--events` of them;
3. verify: `billing ledger verify`'s recomputation of the whole chain, events/s.

`sealer_vs_ingest` = backlog rate / ingestion rate: above 1, the sealer keeps up with the
ledger's write path at its maximum. Prints a table, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from adapters.bus import Streams
from adapters.sealer import SEALS_TABLE, Sealer, connect, seal_next, verify_chain
from adapters.usage_writer import UsageWriter, encode_usage
from domain.records import KeyRecord
from domain.usage import UsageFact
from infra.embedded import embedded_servers
from infra.wiring import setup_schema

EVENTS_DEFAULT = 500_000
BATCH_EVENTS = 1000
INGEST_TASKS = 4
SCHEMA = "bench_sealer"
CATCH_UP_DEADLINE_S = 300.0
POLL_S = 0.01
GROW_ROWS = 500_000  # rows per INSERT ... SELECT when growing the ledger (--total-events)


def _rows(count: int) -> list[list[tuple[UUID, bytes]]]:
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    batches = []
    for start in range(0, count, BATCH_EVENTS):
        batches.append([encode_usage(key, UsageFact(uuid4().hex, "api_calls", Decimal(1), now, {}), now)
                        for _ in range(min(BATCH_EVENTS, count - start))])
    return batches


def _sealed_through(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql.SQL("SELECT coalesce(max(last_position), 0) FROM {}").format(
            sql.Identifier(SCHEMA, SEALS_TABLE))).fetchone()
        return int(row[0]) if row else 0


async def _ingest_with_live_sealer(url: str, batches: list[list[tuple[UUID, bytes]]],
                                   channel: str, head: int) -> dict[str, float]:
    writer = UsageWriter(url, SCHEMA)
    writer.start()
    sealer = Sealer(url, SCHEMA, channel, None, Streams("BENCH_"))
    stop = asyncio.Event()
    sealing = asyncio.create_task(sealer.run(stop))
    queue = list(reversed(batches))
    events = sum(map(len, batches))

    async def load() -> None:
        while queue:
            await writer.append(queue.pop())

    started = time.monotonic()
    await asyncio.gather(*(load() for _ in range(INGEST_TASKS)))
    ingest_s = time.monotonic() - started
    behind = head + events - await asyncio.to_thread(_sealed_through, url)
    caught = time.monotonic()
    while await asyncio.to_thread(_sealed_through, url) < head + events:
        if time.monotonic() - caught > CATCH_UP_DEADLINE_S:
            raise SystemExit("the sealer did not catch up")
        await asyncio.sleep(POLL_S)
    catch_up_s = time.monotonic() - caught
    stop.set()
    await sealing
    await writer.stop()
    return {"ingest_events": events, "ingest_s": round(ingest_s, 3),
            "ingest_events_per_s": round(events / ingest_s),
            "live_sealer_behind_entries": behind, "live_sealer_catch_up_s": round(catch_up_s, 3),
            "live_sealed_blocks": sealer.sealed_blocks}


def _grow(conn: psycopg.Connection[object], events_table: str, more: int) -> None:
    """Append `more` copies of the ledger's first entries under new ids, GROW_ROWS at a time."""
    table = sql.Identifier(SCHEMA, events_table)
    while more > 0:
        n = min(more, GROW_ROWS)
        cur = conn.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state)"
                                   " SELECT gen_random_uuid(), 1, topic, state FROM {}"
                                   " ORDER BY notification_id LIMIT %s").format(table, table), (n,))
        more -= cur.rowcount


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sealer", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=EVENTS_DEFAULT, help="ingested, timed")
    parser.add_argument("--total-events", type=int, default=0,
                        help="grow the ledger to this many entries before sealing the backlog")
    args = parser.parse_args()
    total = max(args.total_events, args.events)
    figures: dict[str, float] = {"events": args.events, "total_events": total}
    batches = _rows(args.events)
    with tempfile.TemporaryDirectory(prefix="bench-sealer-") as tmp, embedded_servers(
            Path(tmp), need_pg=True, need_nats=False, fsync=True) as (pg, _):
        assert pg is not None
        url = pg.url
        ledger = setup_schema(url, SCHEMA)
        try:
            figures |= asyncio.run(_ingest_with_live_sealer(url, batches, ledger.channel,
                                                            ledger.head()))
            with connect(url, SCHEMA) as conn:
                _grow(conn, ledger.events_table, total - args.events)
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(SCHEMA, SEALS_TABLE)))
                conn.execute("CHECKPOINT")
                started = time.monotonic()
                blocks = 0
                while seal_next(conn, SCHEMA, events_table=ledger.events_table) is not None:
                    blocks += 1
                backlog_s = time.monotonic() - started
                started = time.monotonic()
                result = verify_chain(conn, schema=SCHEMA, events_table=ledger.events_table)
                verify_s = time.monotonic() - started
        finally:
            ledger.close()
    assert result.ok and result.sealed_entries == total, result
    backlog_rate = total / backlog_s
    figures |= {"backlog_seal_s": round(backlog_s, 3), "backlog_blocks": blocks,
                "sealer_events_per_s": round(backlog_rate),
                "verify_s": round(verify_s, 3), "verify_events_per_s": round(total / verify_s),
                "sealer_vs_ingest": round(backlog_rate / figures["ingest_events_per_s"], 2)}
    for name, value in figures.items():
        print(f"{name:32} {value}")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
