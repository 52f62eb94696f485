"""Tamper evidence (docs/AUDIT.md): the ledger_seals table, the sealer that seals the ledger in
bounded blocks, and the verifier that recomputes the chain (domain/ledger_chain.py).

One sealer is active at a time (a Postgres advisory lock held by its session); others wait as
hot standbys. Writing a seal also takes a transaction-scoped advisory lock, and the seal's
number is the table's primary key: a second writer (the CLI's `seal_pending`, a sealer that has
just lost its session) can neither fork the chain nor seal a position twice. Each entry's hash
is computed by Postgres (`ENTRY_HASH_SQL`, the same bytes as ledger_chain.entry_bytes), and a
whole block is sealed by one statement, so the sealer handles nothing per entry. The verifier
takes each entry's canonical bytes from Postgres and hashes them itself.

Every seal is published to the JetStream stream <prefix>SEALS (subject <prefix>seals.<seq>,
Nats-Msg-Id seal-<seq>), so that a copy of the chain exists outside Postgres; a seal not yet
acknowledged there is published again on the next pass (`published` column).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from psycopg import sql

from adapters.bookkeeping import lock_key
from adapters.bus import Streams
from adapters.ledger import LEDGER_NAME
from domain.ledger_chain import (
    ENTRY_TAG_BYTES,
    GENESIS,
    Finding,
    Seal,
    check_block,
    check_link,
    parse_digest,
)

log = logging.getLogger("billing.sealer")

SEALS_TABLE = "ledger_seals"
EVENTS_TABLE = f"{LEDGER_NAME}_events"  # the library's table of the ledger (adapters/ledger.py)
SEAL_BLOCK_MAX_ENTRIES = 10_000  # entries per block, at most
SEAL_INTERVAL_S = 0.5  # after a partial block: the least time before the next seal
POLL_INTERVAL_S = 0.5  # idle: wait this long for a NOTIFY, then look anyway (a NOTIFY may be lost)
STANDBY_POLL_S = 1.0
RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DB_CONNECT_TIMEOUT_S = 5
PUBLISH_TIMEOUT_S = 5.0
PUBLISH_BATCH_MAX_SEALS = 100
SEALS_DUPLICATE_WINDOW_S = 600
VERIFY_FETCH_ROWS = 10_000  # rows per round trip of the verifier's server-side cursor
VERIFY_SEAL_PAGE = 16  # seals per read (each carries up to 16 bytes per entry of its block)
SEALER_NAME = "sealer"
SEAL_WRITE_NAME = "seal-write"

DDL = (
    f"""CREATE TABLE IF NOT EXISTS {SEALS_TABLE} (
        seq bigint PRIMARY KEY,
        first_position bigint NOT NULL UNIQUE,
        last_position bigint NOT NULL UNIQUE,
        entry_count integer NOT NULL,
        entries_digest bytea NOT NULL,
        prev_hash bytea NOT NULL,
        hash bytea NOT NULL,
        tags bytea NOT NULL,
        sealed_at timestamptz NOT NULL DEFAULT now(),
        published boolean NOT NULL DEFAULT false
    )""",
    f"CREATE INDEX IF NOT EXISTS {SEALS_TABLE}_unpublished ON {SEALS_TABLE} (seq) WHERE NOT published",
    f"CREATE INDEX IF NOT EXISTS {SEALS_TABLE}_sealed_at ON {SEALS_TABLE} (sealed_at)",
    # Tags are hash prefixes: nothing to compress, and trying costs every seal a compression pass.
    f"ALTER TABLE {SEALS_TABLE} ALTER COLUMN tags SET STORAGE EXTERNAL",
)

# An entry's canonical bytes (domain/ledger_chain.entry_bytes), built by Postgres from a row.
ENTRY_BYTES_SQL = sql.SQL(
    "int8send(notification_id) || uuid_send(originator_id)"
    " || int8send(originator_version::int8)"
    " || int4send(octet_length(convert_to(coalesce(topic, ''), 'UTF8')))"
    " || convert_to(coalesce(topic, ''), 'UTF8')"
    " || int4send(octet_length(coalesce(state, ''::bytea))) || coalesce(state, ''::bytea)")
# Their SHA-256, by Postgres (the sealer; the verifier hashes the bytes itself).
ENTRY_HASH_SQL = sql.SQL("sha256({})").format(ENTRY_BYTES_SQL)

_SEAL_COLUMNS = ("seq, first_position, last_position, entry_count, entries_digest, prev_hash,"
                 " hash, tags")


def seals_stream(streams: Streams) -> str:
    return f"{streams.prefix}SEALS"


def seals_subject(streams: Streams, seq: int | str) -> str:
    return f"{streams.prefix.lower()}seals.{seq}"


def _seal(row: tuple[Any, ...]) -> Seal:
    seq, first, last, count, digest, prev, hash_, tags = row
    return Seal(int(seq), int(first), int(last), int(count), bytes(digest), bytes(prev),
                bytes(hash_), bytes(tags))


def _table(schema: str, events_table: str) -> sql.Composable:
    return sql.Identifier(schema, events_table)


def last_seal(conn: psycopg.Connection[Any], schema: str) -> Seal | None:
    row = conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY seq DESC LIMIT 1").format(
        sql.SQL(_SEAL_COLUMNS), sql.Identifier(schema, SEALS_TABLE))).fetchone()
    return _seal(row) if row else None


# One block sealed by one statement: Postgres hashes the entries, digests them, links the block
# to the previous seal and writes it; nothing per entry crosses to Python. The same arithmetic
# as domain/ledger_chain.make_seal (which `verify_chain` recomputes on its own).
_SEAL_SQL = """
WITH block AS (
  SELECT notification_id AS p, {entry_hash} AS h FROM {events}
  WHERE notification_id > %(after)s ORDER BY notification_id LIMIT %(limit)s
), agg AS (
  SELECT count(*)::int4 AS n, min(p) AS first, max(p) AS last,
         sha256(string_agg(h, ''::bytea ORDER BY p)) AS digest,
         string_agg(int8send(p) || substr(h, 1, {tag}), ''::bytea ORDER BY p) AS tags
  FROM block
)
INSERT INTO {seals} (seq, first_position, last_position, entry_count, entries_digest, prev_hash,
                     hash, tags)
SELECT %(seq)s, first, last, n, digest, %(prev)s, sha256(%(prev)s || digest), tags FROM agg
WHERE n > 0
RETURNING {columns}"""


def seal_next(conn: psycopg.Connection[Any], schema: str, *, events_table: str = EVENTS_TABLE,
              max_entries: int = SEAL_BLOCK_MAX_ENTRIES) -> Seal | None:
    """Seal the next block (up to `max_entries` entries after the last seal), in one
    transaction; the seal, or None when nothing is unsealed. `conn` is in autocommit mode."""
    assert 0 < max_entries <= SEAL_BLOCK_MAX_ENTRIES
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(schema, SEAL_WRITE_NAME),))
        last = last_seal(conn, schema)
        row = conn.execute(
            sql.SQL(_SEAL_SQL).format(
                entry_hash=ENTRY_HASH_SQL, events=_table(schema, events_table),
                seals=sql.Identifier(schema, SEALS_TABLE), columns=sql.SQL(_SEAL_COLUMNS),
                tag=sql.Literal(ENTRY_TAG_BYTES)),
            {"after": last.last_position if last else 0, "limit": max_entries,
             "seq": last.seq + 1 if last else 1, "prev": last.hash if last else GENESIS},
            prepare=True).fetchone()
        return _seal(row) if row else None


def seal_pending(database_url: str, schema: str, *, events_table: str = EVENTS_TABLE) -> int:
    """Seal everything unsealed now (the CLI, tests, a reconciliation that wants the head
    sealed): the number of blocks written. Safe beside a running sealer."""
    blocks = 0
    with psycopg.connect(database_url, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT_S) as conn:
        while seal_next(conn, schema, events_table=events_table) is not None:
            blocks += 1
    return blocks


def connect(database_url: str, schema: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url, autocommit=True, connect_timeout=DB_CONNECT_TIMEOUT_S,
                           options=f"-c search_path={schema}")


class SealMessage(msgspec.Struct, frozen=True):
    """A seal as published to <prefix>SEALS (hashes in hex)."""

    seq: int
    first_position: int
    last_position: int
    entry_count: int
    entries_digest: str
    prev_hash: str
    hash: str
    sealed_at: datetime


async def ensure_seals_stream(js: JetStreamContext, streams: Streams) -> None:
    """The SEALS stream: kept without age or count limits (a seal is ~300 bytes per block)."""
    config = StreamConfig(name=seals_stream(streams), subjects=[seals_subject(streams, ">")],
                          retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                          duplicate_window=SEALS_DUPLICATE_WINDOW_S)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


class Sealer:
    """Seals the ledger continuously while it holds the sealer lock (docs/AUDIT.md)."""

    def __init__(self, database_url: str, schema: str, channel: str, js: JetStreamContext | None,
                 streams: Streams, *, events_table: str = EVENTS_TABLE,
                 block_max_entries: int = SEAL_BLOCK_MAX_ENTRIES,
                 seal_interval_s: float = SEAL_INTERVAL_S) -> None:
        self._url = database_url
        self._schema = schema
        self._channel = channel
        self._js = js
        self._streams = streams
        self._events_table = events_table
        self._max = block_max_entries
        self._interval_s = seal_interval_s
        self._lock_key = lock_key(schema, SEALER_NAME)
        self.is_leader = False
        self.sealed_entries = 0
        self.sealed_blocks = 0
        self.published = 0

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        stream_ready = False
        while not stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                if self._js is not None and not stream_ready:
                    with contextlib.suppress(Exception):  # published later; sealing goes on
                        await ensure_seals_stream(self._js, self._streams)
                        stream_ready = True
                conn = await asyncio.to_thread(connect, self._url, self._schema)
                row = await asyncio.to_thread(
                    lambda c: c.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,)).fetchone(),
                    conn)
                if not (row and row[0]):
                    await _wait(stop, STANDBY_POLL_S)
                    continue
                self.is_leader = True
                log.info("sealer active")
                await asyncio.to_thread(conn.execute, sql.SQL("LISTEN {}").format(
                    sql.Identifier(self._channel)))
                attempt = 0
                await self._lead(conn, stop)
            except (psycopg.Error, OSError) as e:
                log.warning("sealer lost Postgres: %s", e)
                await _wait(stop, RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
                attempt += 1
            finally:
                self.is_leader = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(conn.close)

    async def _lead(self, conn: psycopg.Connection[Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            seal = await asyncio.to_thread(seal_next, conn, self._schema,
                                           events_table=self._events_table, max_entries=self._max)
            if seal is not None:
                self.sealed_blocks += 1
                self.sealed_entries += seal.entry_count
            if self._js is not None:
                await self._publish_pending(conn)
            if seal is not None and seal.entry_count >= self._max:
                continue  # a backlog: the next block at once
            if seal is not None:
                await _wait(stop, self._interval_s)  # fewer, fuller blocks under load
            else:
                await asyncio.to_thread(_wait_notify, conn)

    async def _publish_pending(self, conn: psycopg.Connection[Any]) -> None:
        assert self._js is not None
        rows = await asyncio.to_thread(lambda: conn.execute(
            sql.SQL("SELECT seq, first_position, last_position, entry_count, entries_digest,"
                    " prev_hash, hash, sealed_at FROM {} WHERE NOT published ORDER BY seq LIMIT %s"
                    ).format(sql.Identifier(self._schema, SEALS_TABLE)),
            (PUBLISH_BATCH_MAX_SEALS,)).fetchall())
        done: list[int] = []
        try:
            for seq, first, last, count, digest, prev, hash_, at in rows:
                message = SealMessage(seq, first, last, count, bytes(digest).hex(),
                                      bytes(prev).hex(), bytes(hash_).hex(), at)
                await self._js.publish(seals_subject(self._streams, seq),
                                       msgspec.json.encode(message), timeout=PUBLISH_TIMEOUT_S,
                                       stream=seals_stream(self._streams),
                                       headers={"Nats-Msg-Id": f"seal-{seq}"})
                done.append(int(seq))
        except Exception as e:  # any broker failure: published on a later pass
            log.warning("sealer cannot publish a seal (will retry): %s: %s", type(e).__name__, e)
        if done:
            await asyncio.to_thread(lambda: conn.execute(
                sql.SQL("UPDATE {} SET published = true WHERE seq = ANY(%s)").format(
                    sql.Identifier(self._schema, SEALS_TABLE)), (done,)))
            self.published += len(done)


def _wait_notify(conn: psycopg.Connection[Any]) -> None:
    for _ in conn.notifies(timeout=POLL_INTERVAL_S, stop_after=1):
        break


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


@dataclass(frozen=True)
class VerifyResult:
    """What `verify_chain` found. ok: every sealed row matches its seal and the seals link up
    (and extend the digest, when one was given). first_bad_position: the first ledger position
    that does not match (None when ok, or when only the digest disagrees)."""

    ok: bool
    first_bad_position: int | None
    problem: str | None
    seals: int  # seals checked
    sealed_entries: int  # rows checked against them
    sealed_through: int  # last sealed position (0: nothing sealed)
    unsealed_entries: int  # rows after the last seal (not yet covered)
    head_hash: str | None  # hex of the last seal's hash

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "first_bad_position": self.first_bad_position,
                "problem": self.problem, "seals": self.seals,
                "sealed_entries": self.sealed_entries, "sealed_through": self.sealed_through,
                "unsealed_entries": self.unsealed_entries, "head_hash": self.head_hash}


def iter_seals(conn: psycopg.Connection[Any], schema: str, *, after_seq: int = 0,
               until_seq: int | None = None) -> Iterator[Seal]:
    """Seals in order, a page at a time (bounded memory)."""
    while True:
        rows = conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE seq > %s AND (%s::int8 IS NULL OR seq <= %s)"
                    " ORDER BY seq LIMIT %s").format(
                sql.SQL(_SEAL_COLUMNS), sql.Identifier(schema, SEALS_TABLE)),
            (after_seq, until_seq, until_seq, VERIFY_SEAL_PAGE)).fetchall()
        for row in rows:
            yield _seal(row)
        if len(rows) < VERIFY_SEAL_PAGE:
            return
        after_seq = int(rows[-1][0])


def verify_chain(conn: psycopg.Connection[Any], *, schema: str,
                 from_digest: tuple[int, bytes] | str | None = None,
                 events_table: str = EVENTS_TABLE) -> VerifyResult:
    """Recompute the chain over the rows that exist, in one snapshot, in constant memory (a
    server-side cursor over the rows, the seals a page at a time): the first position that was
    edited, deleted or inserted, a seal that does not link, or (with `from_digest`, a
    (position, hash) that `billing ledger digest` printed earlier) a chain that no longer passes
    through that seal. Rows after the last seal are counted, not judged. `from_digest` may also
    be given as printed, `POS:HASH` (ValueError if it is not one)."""
    if isinstance(from_digest, str):
        from_digest = parse_digest(from_digest)
    autocommit = conn.autocommit
    with conn.transaction():
        if autocommit:  # a transaction of its own: one snapshot for rows and seals
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with conn.cursor(name="ledger_chain_verify", binary=True) as rows_cur:
            rows_cur.itersize = VERIFY_FETCH_ROWS
            # The verifier hashes each entry itself: it takes from Postgres the bytes, not a
            # verdict on them.
            rows_cur.execute(sql.SQL("SELECT notification_id, {} FROM {} ORDER BY notification_id"
                                     ).format(ENTRY_BYTES_SQL, _table(schema, events_table)))
            sha256 = hashlib.sha256
            rows = ((position, sha256(entry).digest()) for position, entry in rows_cur)
            return _walk(conn, schema, rows, from_digest)


def _walk(conn: psycopg.Connection[Any], schema: str, rows: Iterator[tuple[Any, ...]],
          from_digest: tuple[int, bytes] | None) -> VerifyResult:
    prev: Seal | None = None
    checked = 0
    seals = 0
    digest_seen = from_digest is None
    pending = next(rows, None)

    def result(finding: Finding | None, unsealed: int = 0) -> VerifyResult:
        return VerifyResult(finding is None, finding.position if finding else None,
                            finding.problem if finding else None, seals, checked,
                            prev.last_position if prev else 0, unsealed,
                            prev.hash.hex() if prev else None)

    for seal in iter_seals(conn, schema):
        if (finding := check_link(seal, prev)) is not None:
            return result(finding)
        block: list[tuple[int, bytes]] = []
        while pending is not None and pending[0] <= seal.last_position:
            block.append((int(pending[0]), bytes(pending[1])))
            pending = next(rows, None)
        if (finding := check_block(seal, block)) is not None:
            return result(finding)
        seals += 1
        checked += len(block)
        if from_digest is not None and seal.last_position == from_digest[0]:
            if seal.hash != from_digest[1]:
                return result(Finding(None, (
                    f"the chain no longer passes through the digest: the seal ending at position "
                    f"{from_digest[0]} now hashes to {seal.hash.hex()}, not {from_digest[1].hex()};"
                    f" the ledger was rewritten at or before position {from_digest[0]}")))
            digest_seen = True
        prev = seal
    unsealed = 0 if pending is None else 1 + sum(1 for _ in rows)
    if not digest_seen:
        assert from_digest is not None
        return result(Finding(None, f"no seal ends at the digest's position {from_digest[0]}: the "
                              "chain was rewritten, or the digest is of another ledger"), unsealed)
    return result(None, unsealed)
