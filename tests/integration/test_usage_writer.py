"""Group commit: duplicates by primary key, and under pressure a full queue or an unreachable
ledger answers 503 quickly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg import sql

from adapters.usage_writer import (
    CANCEL_WAIT_S,
    PARALLEL_APPEND_MIN_EVENTS,
    UNHEALTHY_HOLD_S,
    WRITER_CONNECTIONS,
    UsageWriter,
    encode_usage,
)
from domain.errors import Unavailable
from domain.records import KeyRecord
from domain.usage import UsageFact
from infra.embedded import free_port
from infra.wiring import Runtime, setup_schema
from tests.conftest import ThreadedWriter, threaded_writer, wait_sync

KEY = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
NOW = datetime.now(UTC)
RESULT_TIMEOUT_S = 10


def rows(n: int) -> list[tuple[UUID, bytes]]:
    return [encode_usage(KEY, UsageFact(uuid4().hex, "m", Decimal(1), NOW, {}), NOW)
            for _ in range(n)]


def test_a_full_queue_refuses_at_once_instead_of_piling_up(runtime: Runtime) -> None:
    writer = ThreadedWriter(UsageWriter(runtime.database_url, runtime.settings.pg_schema,
                                        queue_max_events=10, batch_max_events=5))
    table = sql.Identifier(runtime.settings.pg_schema, runtime.ledger.events_table)
    try:
        with psycopg.connect(runtime.database_url) as blocker:
            # Another transaction holds the ledger's lock: the writer's first commit waits (the
            # second connection joins only for PARALLEL_APPEND_MIN_EVENTS, more than fit here).
            blocker.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
            in_flight = [writer.submit(rows(5))]
            wait_sync(lambda: writer.writer.commits == 0 and _waiting_for_lock(runtime) == 1,
                      "the writer waiting for the ledger lock")
            queued = writer.submit(rows(5))
            wait_sync(lambda: writer.writer.queued_events == 5, "the third batch queued")
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                writer.submit(rows(6)).result(RESULT_TIMEOUT_S)  # 5 queued + 6 > 10
            assert time.monotonic() - started < 0.5
            assert info.value.retry_after_s >= 1
        # The lock is gone: what was queued commits, nothing refused was written.
        assert [f.result(RESULT_TIMEOUT_S).accepted for f in in_flight] == [5]
        assert queued.result(RESULT_TIMEOUT_S).accepted == 5
        assert ledger_rows(runtime) == 10
    finally:
        writer.close()


def test_under_batch_load_a_second_connection_waits_for_the_lock_with_the_next_batch(
    runtime: Runtime,
) -> None:
    batch = PARALLEL_APPEND_MIN_EVENTS // 2 + 1
    writer = ThreadedWriter(UsageWriter(runtime.database_url, runtime.settings.pg_schema,
                                        batch_max_events=batch))
    table = sql.Identifier(runtime.settings.pg_schema, runtime.ledger.events_table)
    try:
        with psycopg.connect(runtime.database_url) as blocker:
            blocker.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
            first = writer.submit(rows(batch))
            wait_sync(lambda: _waiting_for_lock(runtime) == 1, "the first append waiting")
            rest = [writer.submit(rows(batch)) for _ in range(2)]  # enough queued: both join
            wait_sync(lambda: _waiting_for_lock(runtime) == WRITER_CONNECTIONS,
                      "the second connection waiting with the next batch")
        results = [f.result(RESULT_TIMEOUT_S) for f in (first, *rest)]
        assert [r.accepted for r in results] == [batch] * 3
        # Taken in order, committed in order: a later batch answers a later position.
        assert results[0].position < min(r.position for r in results[1:])
        assert ledger_rows(runtime) == 3 * batch
    finally:
        writer.close()


def ledger_rows(rt: Runtime) -> int:
    table = sql.Identifier(rt.settings.pg_schema, rt.ledger.events_table)
    with rt.pool.connection() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
    return int(row[0]) if row else 0


def _waiting_for_lock(rt: Runtime) -> int:
    """How many appends wait for the ledger's table lock."""
    with rt.pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE %s", ("%billing_append_usage%",)).fetchone()
    return int(row[0]) if row else 0


def test_an_unreachable_ledger_answers_503_quickly_and_then_at_once() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    writer = ThreadedWriter(UsageWriter(url, "public"))
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            writer.submit(rows(3)).result(RESULT_TIMEOUT_S)
        assert time.monotonic() - started < 3
        fast = time.monotonic()
        with pytest.raises(Unavailable):
            writer.submit(rows(1)).result(RESULT_TIMEOUT_S)
        assert time.monotonic() - fast < UNHEALTHY_HOLD_S
    finally:
        writer.close()


def _writer_backend(rt: Runtime) -> int:
    """The backend of this schema's idle usage writer connection (its last query: the append)."""
    with rt.pool.connection() as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle' AND query LIKE %s"
            " AND query LIKE %s", ("%billing_append_usage%", f"%{rt.settings.pg_schema}%")).fetchone()
    assert row is not None, "the writer's connection"
    return int(row[0])


def test_stop_is_bounded_when_postgres_stops_answering_mid_append(runtime: Runtime) -> None:
    stop_s = 0.5
    writer = ThreadedWriter(UsageWriter(runtime.database_url, runtime.settings.pg_schema,
                                        stop_timeout_s=stop_s))
    backend = 0
    try:
        writer.submit(rows(1)).result(RESULT_TIMEOUT_S)  # connected
        backend = _writer_backend(runtime)
        os.kill(backend, signal.SIGSTOP)  # alive, silent: not even a cancel gets an answer
        hung = writer.submit(rows(2))
        wait_sync(lambda: writer.writer.in_flight_events == 2, "the append sent")
        started = time.monotonic()
        writer.close()
        # psycopg alone would wait 5 s more for the server to confirm the cancellation.
        assert time.monotonic() - started < stop_s + CANCEL_WAIT_S + 1.0
        with pytest.raises(Unavailable):
            hung.result(0)  # answered (503: retry), not left hanging
    finally:
        if backend:
            os.kill(backend, signal.SIGCONT)
            with runtime.pool.connection() as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (backend,))


def test_every_row_is_stored_as_sent_identity_and_state_byte_for_byte(runtime: Runtime) -> None:
    sent = rows(1500)  # more than one request's worth, in one parameter of each kind
    sent[7] = (sent[7][0], b"")  # no state at all: length 0, not NULL
    sent[8] = (sent[8][0], bytes(range(256)) * 300)  # every byte value, over 64 KiB
    with threaded_writer(runtime) as writer:
        appended = writer.submit(sent).result(RESULT_TIMEOUT_S)
    assert (appended.accepted, appended.duplicates) == (1500, 0)
    table = sql.Identifier(runtime.settings.pg_schema, runtime.ledger.events_table)
    with psycopg.connect(runtime.database_url) as conn:
        stored: dict[UUID, bytes] = dict(conn.execute(sql.SQL(
            "SELECT originator_id, state FROM {} WHERE originator_id = ANY(%s)").format(table),
            ([ident for ident, _ in sent],)).fetchall())
    assert stored == dict(sent)


def test_resends_in_one_group_commit_keep_the_first(runtime: Runtime) -> None:
    with threaded_writer(runtime) as writer:
        same = rows(3)
        futures = [writer.submit(same) for _ in range(4)]
        results = [f.result(RESULT_TIMEOUT_S) for f in futures]
    assert sum(r.accepted for r in results) == 3
    assert sum(r.duplicates for r in results) == 9
    assert ledger_rows(runtime) == 3


def test_a_resend_later_is_a_duplicate_that_changes_nothing(runtime: Runtime) -> None:
    with threaded_writer(runtime) as writer:
        sent = rows(4)
        first = writer.submit(sent).result(RESULT_TIMEOUT_S)
        mixed = writer.submit(sent[:2] + rows(1)).result(RESULT_TIMEOUT_S)
        again = writer.submit(sent).result(RESULT_TIMEOUT_S)
    assert (first.accepted, first.duplicates) == (4, 0)
    assert (mixed.accepted, mixed.duplicates) == (1, 2)
    assert (again.accepted, again.duplicates) == (0, 4)
    assert ledger_rows(runtime) == 5
    # An all-duplicate request still gets a position that covers the originals.
    assert again.position >= mixed.position > first.position


def test_a_failed_commit_answers_its_requests_and_the_writer_carries_on(runtime: Runtime) -> None:
    with threaded_writer(runtime) as writer:
        # An identity of 15 bytes, which Postgres refuses (a uuid is 16): the commit fails.
        broken = writer.writer.append_rows([b"\0" * 15], [b"not a usage row"])
        with pytest.raises(Unavailable):
            asyncio.run_coroutine_threadsafe(broken, writer.loop).result(RESULT_TIMEOUT_S)

        def accepted_after_the_hold() -> int:
            try:
                return writer.submit(rows(2)).result(RESULT_TIMEOUT_S).accepted
            except Unavailable:
                return 0  # still within UNHEALTHY_HOLD_S of the failure

        assert wait_sync(accepted_after_the_hold, "the writer accepting again") == 2
    assert ledger_rows(runtime) == 2


def test_setup_replaces_an_append_function_of_an_earlier_version_in_place(runtime: Runtime) -> None:
    """A ledger made by an earlier version keeps working: its append function (same signature,
    older body) is replaced, an interim one taking ids as bytea is dropped."""
    schema = runtime.settings.pg_schema
    name = sql.Identifier(schema, "billing_append_usage")
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL(
            "CREATE OR REPLACE FUNCTION {}(ids uuid[], states bytea[], OUT head bigint,"
            " OUT inserted bigint, OUT inserted_ids uuid[]) LANGUAGE plpgsql AS"
            " $$ BEGIN head := -1; inserted := 0; END $$").format(name))
        conn.execute(sql.SQL(
            "CREATE OR REPLACE FUNCTION {}(ids bytea, states bytea[], OUT head bigint,"
            " OUT inserted bigint, OUT inserted_ids uuid[]) LANGUAGE plpgsql AS"
            " $$ BEGIN head := -1; inserted := 0; END $$").format(name))
    setup_schema(runtime.database_url, schema).close()
    with psycopg.connect(runtime.database_url, autocommit=True) as conn:
        signatures = conn.execute(
            "SELECT oidvectortypes(p.proargtypes) FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'billing_append_usage' AND n.nspname = %s", (schema,)).fetchall()
    assert signatures == [("uuid[], bytea[]",)]
    with threaded_writer(runtime) as writer:
        appended = writer.submit(rows(3)).result(RESULT_TIMEOUT_S)
    assert appended.accepted == 3 and appended.position > 0  # the new body, not the old
    assert ledger_rows(runtime) == 3
