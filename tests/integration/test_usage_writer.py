"""Group commit under pressure: a full queue or an unreachable ledger answers 503 quickly."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from adapters.usage_writer import UNHEALTHY_HOLD_S, UsageWriter, encode_usage
from domain.errors import Unavailable
from domain.ports import KeyRecord
from domain.usage import UsageFact
from infra.embedded import free_port
from infra.wiring import Runtime

KEY = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
NOW = datetime.now(UTC)


def rows(n: int) -> list[tuple[UUID, bytes]]:
    return [encode_usage(KEY, UsageFact(uuid4().hex, "m", Decimal(1), NOW, {}), NOW)
            for _ in range(n)]


def test_a_full_queue_refuses_at_once_instead_of_piling_up(runtime: Runtime) -> None:
    writer = UsageWriter(runtime.database_url, runtime.settings.pg_schema,
                         runtime.ledger.events_table, runtime.ledger.channel,
                         queue_max_events=10, batch_max_events=5)
    # Not started: nothing drains the queue.
    writer.submit(rows(6))
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        writer.submit(rows(5))
    assert time.monotonic() - started < 0.1
    assert info.value.retry_after_s >= 1


def test_an_unreachable_ledger_answers_503_quickly_and_then_at_once() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    writer = UsageWriter(url, "public", "billing_events", "billing_events")
    writer.start()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            writer.submit(rows(3)).result(10)
        assert time.monotonic() - started < 3
        fast = time.monotonic()
        with pytest.raises(Unavailable):
            writer.submit(rows(1))
        assert time.monotonic() - fast < UNHEALTHY_HOLD_S
    finally:
        writer.stop()


def test_resends_in_one_group_commit_keep_the_first(runtime: Runtime) -> None:
    writer = UsageWriter(runtime.database_url, runtime.settings.pg_schema,
                         runtime.ledger.events_table, runtime.ledger.channel)
    writer.start()
    try:
        same = rows(3)
        futures = [writer.submit(same) for _ in range(4)]
        results = [f.result(10) for f in futures]
    finally:
        writer.stop()
    assert sum(r.accepted for r in results) == 3
    assert sum(r.duplicates for r in results) == 9
