"""Replay at scale: the replay engine (adapters/replay.py) over 1M and 5M ledger events, next to
the same run's raw Postgres read-and-fold rate (the same server-side cursor, folding counts and
byte sums per topic in Python), and the peak RSS of each (every measurement in its own spawned
process, so a peak is its own).

The ledger is written with COPY (usage of 50 organisations x 3 meters over 30 days: the fold's
buckets stay the same whatever the length, so memory must stay flat). Prints one line per
measurement and, last, one JSON object. Run: `python -m bench.replay [--sizes 1000000,5000000]`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import resource
import signal
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
from eventsourcing.utils import get_topic
from psycopg import sql

from adapters.replay import REPLAY_FETCH_ROWS, Replayer, ledger_query
from adapters.usage_writer import encode_batch
from domain.meter import Meter
from domain.organisation import Organisation, OrganisationSettings
from domain.records import KeyRecord
from domain.usage import Usage, UsageBatch
from infra.embedded import embedded_servers
from infra.settings import from_env
from infra.wiring import READ_MODELS, Runtime

SIZES_DEFAULT = (1_000_000, 5_000_000)
ORGS = 50
METERS = (("calls", "count"), ("gb", "sum"), ("seats", "max"))
DAYS = 30
COPY_CHUNK_EVENTS = 50_000  # events encoded and copied at a time
SCHEMA = "bench_replay"
PROFILE_LINES = 25
REPEAT_DEFAULT = 2
START = datetime(2026, 10, 1, tzinfo=UTC)


def _events(first: int, total: int, keys: list[KeyRecord], now: datetime
            ) -> Iterator[tuple[bytes, bytes]]:
    """(identity, state) of usage events `first` to `total`, spread over keys, meters and days."""
    made = first
    while made < total:
        n = min(COPY_CHUNK_EVENTS, total - made)
        key = keys[(made // COPY_CHUNK_EVENTS) % len(keys)]
        ids = [f"e{made + i}" for i in range(n)]
        metrics = [METERS[(made + i) % len(METERS)][0] for i in range(n)]
        values = [Decimal((made + i) % 97) for i in range(n)]
        moments = [START + timedelta(minutes=((made + i) * 7) % (DAYS * 24 * 60))
                   for i in range(n)]
        batch = UsageBatch(ids, metrics, values, moments, [{}] * n)
        id_bytes, states = encode_batch(key, batch, now)
        yield from zip(id_bytes, states, strict=True)
        made += n


def fill(database_url: str, size: int, keys: list[KeyRecord], table: str, now: datetime,
         already: int) -> float:
    """COPY usage rows into the ledger until it holds `size` usage events."""
    started = time.perf_counter()
    topic = get_topic(Usage.Recorded)
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (originator_id, originator_version, topic, state)"
                              " FROM STDIN (FORMAT BINARY)").format(sql.SQL(table))) as copy:
            copy.set_types(["uuid", "int8", "text", "bytea"])
            for ident, state in _events(already, size, keys, now):
                copy.write_row((UUID(bytes=ident), 1, topic, state))
        conn.commit()
    return time.perf_counter() - started


def _raw(database_url: str, table: str, out: Any) -> None:
    """The raw read-and-fold: the same query, cursor and page size, folding counts and byte
    sums per topic in Python."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    rows = 0
    with psycopg.connect(database_url) as conn, conn.cursor(name="raw", binary=True) as cur:
        cur.itersize = REPLAY_FETCH_ROWS
        cur.execute(ledger_query(sql.SQL(table)), (get_topic(Usage.Recorded), 2**62))
        while page := cur.fetchmany(REPLAY_FETCH_ROWS):
            for _position, topic, state, _id, _version in page:
                counts[topic] = counts.get(topic, 0) + 1
                sizes[topic] = sizes.get(topic, 0) + len(state)
            rows += len(page)
    elapsed = time.perf_counter() - started
    out.put({"rows": rows, "s": elapsed, "rss_mb": _peak_rss_mb()})


def _replay(database_url: str, events_table: str, out: Any, profile: bool = False) -> None:
    replayer = Replayer(database_url, SCHEMA, events_table, READ_MODELS)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    with replayer.snapshot() as conn:
        state = replayer.run(conn)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(PROFILE_LINES)
    out.put({"rows": state.events, "usage": state.usage_events, "buckets": len(state.totals),
             "s": elapsed, "rss_mb": _peak_rss_mb()})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args[:2], out, *args[2:]))
    child.start()
    answer: dict[str, Any] = out.get()
    child.join()
    return answer


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a kill stops the embedded Postgres on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupted)
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default=",".join(map(str, SIZES_DEFAULT)))
    p.add_argument("--profile", action="store_true", help="cProfile the replay (its top lines)")
    p.add_argument("--repeat", type=int, default=REPEAT_DEFAULT, help="runs of each, best kept")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, embedded_servers(
            Path(tmp), need_pg=True, need_nats=False, fsync=False) as (pg, _):
        assert pg is not None
        settings = from_env({"BILLING_DATA_DIR": tmp, "BILLING_PG_SCHEMA": SCHEMA})
        rt = Runtime.open(settings, pg.url, "")
        now = datetime.now(UTC)
        meters = [Meter.define(code, code, agg, None, [], False, now) for code, agg in METERS]
        orgs = [Organisation.create(uuid4(), OrganisationSettings(
            name=f"org{i}", billing_email=f"o{i}@b.in", state_code="29"), now) for i in range(ORGS)]
        rt.ledger.save(*meters, *orgs, actor=None)
        keys = [KeyRecord(uuid4(), "p", "h", uuid4(), org.id, "Asia/Kolkata", None, False)
                for org in orgs]
        have = 0
        for size in sizes:
            fill_s = fill(pg.url, size, keys, rt.ledger.table, now, have)
            have = size
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE " + rt.ledger.table)
                # The usage model has "applied" the whole ledger: the replay folds all of it.
                conn.execute(sql.SQL(
                    "INSERT INTO {} (name, position) VALUES ('usage_totals', %s)"
                    " ON CONFLICT (name) DO UPDATE SET position = excluded.position").format(
                    sql.Identifier(SCHEMA, "projection_tracking")), (rt.ledger.head(),))
            # Alternated, best of `--repeat` each: the machine is shared, and the best run is
            # the one least slowed by others.
            raws, replays = [], []
            for _ in range(args.repeat):
                raws.append(_in_child(_raw, pg.url, rt.ledger.table))
                replays.append(_in_child(_replay, pg.url, rt.ledger.events_table, args.profile))
            raw = min(raws, key=lambda r: r["s"])
            replay = min(replays, key=lambda r: r["s"])
            ratio = (replay["rows"] / replay["s"]) / (raw["rows"] / raw["s"])
            results[str(size)] = {"fill_s": round(fill_s, 1), "raw": raw, "replay": replay,
                                  "raw_rows_per_s": round(raw["rows"] / raw["s"]),
                                  "replay_events_per_s": round(replay["rows"] / replay["s"]),
                                  "replay_vs_raw": round(ratio, 3)}
            print(f"{size:>9} events: raw read-and-fold {raw['rows'] / raw['s']:>10,.0f} rows/s"
                  f" (peak RSS {raw['rss_mb']:.0f} MB); replay {replay['rows'] / replay['s']:>10,.0f}"
                  f" events/s (peak RSS {replay['rss_mb']:.0f} MB); replay/raw {ratio:.3f}",
                  flush=True)
        rt.pool.close()
        rt.ledger.close()
    if len(sizes) > 1:
        first, last = results[str(sizes[0])], results[str(sizes[-1])]
        results["replay_rss_growth"] = round(
            last["replay"]["rss_mb"] / first["replay"]["rss_mb"] - 1, 3)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
