"""Same-run baselines on the bench's Postgres: what the database itself does with the ledger's
row shape (uuid, bigint, text, bytea holding a real ~250-byte encoded usage event), with no
service in between.

- `copy_rows_per_s`: one binary COPY (psycopg) of every row into a fresh table, one transaction.
  `ledger_shape=True` gives the table the ledger's own indexes (primary key on
  (originator_id, originator_version), bigserial notification_id with a unique index).
- `row_insert_rows_per_s`: one row per transaction (autocommit INSERT), over N connections in
  threads, bounded in rows and time.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from adapters.usage_writer import USAGE_TOPIC, encode_usage
from domain.records import KeyRecord
from domain.usage import UsageFact

SCHEMA = "bench_baseline"
DISTINCT_STATES = 1000  # real encoded events, reused round-robin (each row gets its own uuid)
CONNECT_TIMEOUT_S = 10
START_TIMEOUT_S = 30.0
PROPERTIES = {"endpoint": "/v1/things", "region": "ap-south-1"}

PLAIN_DDL = ("CREATE TABLE {} (originator_id uuid NOT NULL, originator_version bigint NOT NULL,"
             " topic text, state bytea)")
LEDGER_SHAPE_DDL = ("CREATE TABLE {} (originator_id uuid NOT NULL, originator_version bigint NOT NULL,"
                    " topic text, state bytea, notification_id bigserial,"
                    " PRIMARY KEY (originator_id, originator_version))")


def sample_states(count: int = DISTINCT_STATES) -> list[bytes]:
    """Ledger states exactly as the usage writer encodes them."""
    key = KeyRecord(key_id=uuid4(), prefix="0" * 12, secret_sha256="", project_id=uuid4(),
                    organisation_id=uuid4(), timezone="Asia/Kolkata", expires_at=None,
                    revoked=False)
    now = datetime.now(UTC)
    return [
        encode_usage(key, UsageFact(f"baseline-{i:06d}", "api_calls", Decimal(1), now, PROPERTIES),
                     now)[1]
        for i in range(count)
    ]


def fresh_table(conn: psycopg.Connection[tuple[object, ...]], name: str, *,
                 ledger_shape: bool) -> sql.Identifier:
    table = sql.Identifier(SCHEMA, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    conn.execute(sql.SQL(LEDGER_SHAPE_DDL if ledger_shape else PLAIN_DDL).format(table))
    if ledger_shape:
        conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (notification_id)").format(table))
    return table


def checkpoint(url: str) -> int:
    """Run a CHECKPOINT and return how many checkpoints the server has started so far.

    A checkpoint in progress halves this machine's COPY rate (measured: 540-620k rows/s before
    the first one, 310-360k while it runs), and the default max_wal_size starts one after about
    540 MB of WAL, i.e. somewhere inside any run of this bench. So every measured phase, the
    pipeline's and the baselines' alike, starts right after one, with the same WAL headroom.
    """
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute("CHECKPOINT")
        return checkpoints_started(conn)


def checkpoints_started(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT num_timed + num_requested FROM pg_stat_checkpointer").fetchone()
    assert row is not None
    return int(str(row[0]))


def copy_rows_per_s(url: str, rows: int, states: list[bytes], *, ledger_shape: bool) -> float:
    """Rows/s of one binary COPY of `rows` rows, timed from COPY start to COMMIT done."""
    ids: list[UUID] = [uuid4() for _ in range(rows)]
    name = "copy_ledger_shape" if ledger_shape else "copy_plain"
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        table = fresh_table(conn, name, ledger_shape=ledger_shape)
        statement = sql.SQL(
            "COPY {} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
        ).format(table)
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types(["uuid", "int8", "text", "bytea"])
            for ident, state in zip(ids, itertools.cycle(states), strict=False):
                copy.write_row((ident, 1, USAGE_TOPIC, state))
        elapsed = time.perf_counter() - started
    return rows / elapsed


def row_insert_rows_per_s(url: str, states: list[bytes], connections: int, duration_s: float,
                          rows_max: int) -> tuple[float, int]:
    """(rows/s, rows) of autocommit one-row INSERTs over `connections` threads."""
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        table = fresh_table(conn, "row_insert", ledger_shape=False)
    statement = sql.SQL(
        "INSERT INTO {} (originator_id, originator_version, topic, state) VALUES (%s, 1, %s, %s)"
    ).format(table)
    counter = itertools.count()
    start = threading.Barrier(connections + 1, timeout=START_TIMEOUT_S)
    inserted = [0] * connections
    errors: list[BaseException] = []
    deadline = [0.0]

    def run(slot: int) -> None:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as c:
                start.wait()
                while time.perf_counter() < deadline[0]:
                    i = next(counter)
                    if i >= rows_max:
                        return
                    c.execute(statement, (uuid4(), USAGE_TOPIC, states[i % len(states)]),
                              prepare=True)
                    inserted[slot] += 1
        except BaseException as e:
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,), name=f"row-insert-{i}", daemon=True)
               for i in range(connections)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + START_TIMEOUT_S + duration_s  # until released below
    start.wait()
    started = time.perf_counter()
    deadline[0] = started + duration_s
    for t in threads:
        t.join(duration_s + START_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"row INSERT baseline failed: {errors[0]!r}")
    rows = sum(inserted)
    return rows / elapsed, rows
