"""Tamper evidence (issue 18): the hash chain catches a ledger row edited, deleted or inserted
by hand, naming its position; a chain rewritten consistently from some position is caught by
a digest kept from before; positions skipped by rolled-back inserts are not differences; two
sealers -> one active, and the chain has no gaps and no double seals."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from adapters.sealer import (
    ENTRY_HASH_SQL,
    SEALS_TABLE,
    Sealer,
    connect,
    last_seal,
    seal_next,
    seal_pending,
    seals_stream,
    verify_chain,
)
from domain.ledger_chain import entry_hash
from domain.organisation import OrganisationSettings
from domain.services.organisations import OrganisationService
from infra.wiring import Runtime
from tests.conftest import close_nats, running, wait_until

BLOCK = 7  # entries per block in these tests: several blocks from a few dozen entries


def append(rt: Runtime, count: int) -> None:
    service = OrganisationService(rt.ledger, lambda: datetime.now(UTC), uuid4)
    for i in range(count):
        service.create(OrganisationSettings(name=f"org {i}", billing_email="a@b.in"), actor=None)


def rolled_back_insert(rt: Runtime) -> int:
    """A position taken by an insert that rolled back (a legitimate gap); returns it."""
    with psycopg.connect(rt.database_url) as conn:
        row = conn.execute(sql.SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state)"
            " VALUES (%s, 1, 'x', '\\x00') RETURNING notification_id").format(
            sql.Identifier(rt.settings.pg_schema, rt.ledger.events_table)), (uuid4(),)).fetchone()
        conn.rollback()
    assert row is not None
    return int(row[0])


def seal_all(rt: Runtime) -> None:
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        while seal_next(conn, rt.settings.pg_schema, events_table=rt.ledger.events_table,
                        max_entries=BLOCK):
            pass


def verify(rt: Runtime, digest: tuple[int, bytes] | None = None) -> Any:
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        return verify_chain(conn, schema=rt.settings.pg_schema, from_digest=digest,
                            events_table=rt.ledger.events_table)


def execute(rt: Runtime, statement: str, *params: Any) -> None:
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        conn.execute(sql.SQL(statement).format(
            table=sql.Identifier(rt.settings.pg_schema, rt.ledger.events_table)), params)


@pytest.fixture
def sealed(runtime: Runtime) -> tuple[Runtime, int]:
    """20 entries, a rolled-back insert's gap, 10 more, all sealed in blocks of BLOCK."""
    append(runtime, 20)
    gap = rolled_back_insert(runtime)
    append(runtime, 10)
    seal_all(runtime)
    return runtime, gap


def test_a_gap_is_no_difference_and_postgres_hashes_entries_as_the_domain_does(
        sealed: tuple[Runtime, int]) -> None:
    rt, gap = sealed
    result = verify(rt)
    assert result.ok, result
    assert (result.seals, result.sealed_entries, result.unsealed_entries) == (5, 30, 0)
    assert result.sealed_through == rt.ledger.head() and gap < result.sealed_through
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state, {} FROM {}"
            " ORDER BY notification_id").format(
            ENTRY_HASH_SQL, sql.Identifier(rt.settings.pg_schema, rt.ledger.events_table))).fetchall()
    assert len(rows) == 30
    for position, originator, version, topic, state, hashed in rows:
        assert entry_hash(position, originator, version, topic, bytes(state)) == bytes(hashed)


def test_an_edited_row_is_named(sealed: tuple[Runtime, int]) -> None:
    rt, _ = sealed
    execute(rt, "UPDATE {table} SET state = state || '\\x00'::bytea WHERE notification_id = %s", 12)
    result = verify(rt)
    assert (result.ok, result.first_bad_position) == (False, 12)
    assert "edited" in result.problem


def test_a_deleted_row_is_named(sealed: tuple[Runtime, int]) -> None:
    rt, _ = sealed
    execute(rt, "DELETE FROM {table} WHERE notification_id = %s", 17)
    result = verify(rt)
    assert (result.ok, result.first_bad_position) == (False, 17)
    assert "deleted" in result.problem


def test_a_row_inserted_into_a_gap_is_named(sealed: tuple[Runtime, int]) -> None:
    rt, gap = sealed
    execute(rt, "INSERT INTO {table} (notification_id, originator_id, originator_version, topic, state)"
            " VALUES (%s, %s, 1, 'domain.organisation:Organisation.Created', '\\x80')", gap, uuid4())
    result = verify(rt)
    assert (result.ok, result.first_bad_position) == (False, gap)
    assert "inserted" in result.problem


def test_a_consistent_rewrite_is_caught_by_the_digest_kept_from_before(
        sealed: tuple[Runtime, int]) -> None:
    rt, _ = sealed
    schema = rt.settings.pg_schema
    with connect(rt.database_url, schema) as conn:
        head = last_seal(conn, schema)
        early = conn.execute(sql.SQL("SELECT last_position, hash FROM {} WHERE seq = 1").format(
            sql.Identifier(schema, SEALS_TABLE))).fetchone()
    assert head is not None and early is not None
    digest = (head.last_position, head.hash)
    assert verify(rt, digest).ok
    # Rewrite position 12 and every seal from its block on, consistently.
    execute(rt, "UPDATE {table} SET state = state || '\\x00'::bytea WHERE notification_id = %s", 12)
    with connect(rt.database_url, schema) as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE last_position >= 12").format(
            sql.Identifier(schema, SEALS_TABLE)))
    seal_all(rt)
    assert verify(rt).ok  # without an anchor, a rewritten chain is a chain
    caught = verify(rt, digest)
    assert not caught.ok and "rewritten" in caught.problem, caught
    # A digest older than the rewrite still holds: the chain up to it was not touched.
    assert verify(rt, (int(early[0]), bytes(early[1]))).ok
    assert not verify(rt, (digest[0] + 1000, digest[1])).ok  # no seal ends there


@pytest.mark.anyio
async def test_two_sealers_one_active_no_gaps_no_double_seals(runtime: Runtime) -> None:
    rt = runtime
    js = await rt.connect_nats("test-sealers")
    sealers = [Sealer(rt.database_url, rt.settings.pg_schema, rt.ledger.channel, js, rt.streams,
                      events_table=rt.ledger.events_table, block_max_entries=5,
                      seal_interval_s=0.01) for _ in range(2)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in sealers]
    try:
        await wait_until(lambda: any(s.is_leader for s in sealers), "a sealer active")
        for _ in range(4):  # appends while they run, in between seals
            await asyncio.to_thread(append, rt, 6)
            # And a CLI seal racing the active sealer: a second writer cannot fork the chain.
            await asyncio.to_thread(seal_pending, rt.database_url, rt.settings.pg_schema,
                                    events_table=rt.ledger.events_table)
        head = rt.ledger.head()
        await wait_until(lambda: verify(rt).sealed_through == head, "everything sealed")
        assert sum(s.is_leader for s in sealers) == 1
        assert sum(s.sealed_entries for s in sealers if not s.is_leader) == 0
        with connect(rt.database_url, rt.settings.pg_schema) as conn:
            seals = conn.execute(sql.SQL("SELECT seq, first_position, last_position, entry_count"
                                         " FROM {} ORDER BY seq").format(
                sql.Identifier(rt.settings.pg_schema, SEALS_TABLE))).fetchall()
        assert [s[0] for s in seals] == list(range(1, len(seals) + 1))
        assert all(b[1] > a[2] for a, b in itertools.pairwise(seals))
        assert sum(s[3] for s in seals) == 24
        result = verify(rt)
        assert result.ok and result.sealed_entries == 24, result

        async def published() -> int:
            return int((await js.stream_info(seals_stream(rt.streams))).state.messages)

        end = asyncio.get_running_loop().time() + 20
        while await published() < len(seals):  # the copy outside Postgres
            assert asyncio.get_running_loop().time() < end, "seals not published"
            await asyncio.sleep(0.05)
        msg = await js.get_msg(seals_stream(rt.streams), seq=1)
        assert msg.data is not None and b'"seq":1' in msg.data
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await close_nats(rt)


def test_verify_names_a_seal_that_was_removed(sealed: tuple[Runtime, int]) -> None:
    rt, _ = sealed
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE seq = 2").format(
            sql.Identifier(rt.settings.pg_schema, SEALS_TABLE)))
    result = verify(rt)
    assert not result.ok and "missing" in result.problem, result


@pytest.mark.anyio
async def test_the_seal_role_seals_what_is_appended(runtime: Runtime) -> None:
    rt = runtime
    async with running(rt, {"seal"}):
        await asyncio.to_thread(append, rt, 3)
        head = rt.ledger.head()
        await wait_until(lambda: verify(rt).sealed_through == head, "the role sealing the head")
    assert verify(rt).ok


def test_the_last_row_deleted_is_named_and_the_last_seal_deleted_is_caught_by_a_digest(
        sealed: tuple[Runtime, int]) -> None:
    rt, _ = sealed
    head = rt.ledger.head()
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        last = last_seal(conn, rt.settings.pg_schema)
    assert last is not None and last.last_position == head
    execute(rt, "DELETE FROM {table} WHERE notification_id = %s", head)
    result = verify(rt)
    assert (result.ok, result.first_bad_position) == (False, head) and "deleted" in result.problem
    # The last seal removed too: its rows are "not sealed yet" (the chain ends earlier), which
    # only the digest kept from before can tell from a chain that never went further.
    with connect(rt.database_url, rt.settings.pg_schema) as conn:
        conn.execute(sql.SQL("DELETE FROM {} WHERE seq = %s").format(
            sql.Identifier(rt.settings.pg_schema, SEALS_TABLE)), (last.seq,))
    assert verify(rt).ok
    result = verify(rt, (last.last_position, last.hash))
    assert not result.ok and "no seal ends" in result.problem, result
