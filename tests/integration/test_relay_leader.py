"""Only one relay publishes at a time; a standby takes over when the leader stops."""

from __future__ import annotations

import asyncio

import pytest

from adapters.relay import Relay
from infra.wiring import Runtime
from tests.conftest import close_nats, wait_until
from tests.integration.helpers import write_orgs

pytestmark = pytest.mark.anyio


async def test_second_relay_waits_as_standby_and_takes_over(runtime: Runtime) -> None:
    js = await runtime.connect_nats("test")

    def relay() -> Relay:
        return Relay(runtime.ledger, runtime.database_url, runtime.settings.pg_schema, js,
                     runtime.streams)

    first, second = relay(), relay()
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(first.run(stop_first))
    await wait_until(lambda: first.is_leader, "first relay leads")
    t2 = asyncio.create_task(second.run(stop_second))
    try:
        await asyncio.to_thread(write_orgs, runtime, 4)
        head = runtime.ledger.head()
        await wait_until(lambda: first.published_entries >= head, "first publishes")
        assert not second.is_leader and second.published_entries == 0

        stop_first.set()
        await asyncio.wait_for(t1, 30)
        await asyncio.to_thread(write_orgs, runtime, 2, "later")
        head = runtime.ledger.head()
        await wait_until(lambda: second.is_leader, "standby takes over")
        await wait_until(
            lambda: first.published_entries + second.published_entries >= head, "second publishes"
        )
        info = await js.stream_info(runtime.streams.ledger)
        assert info.state.messages >= 1
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(t1, t2), 30)
        await close_nats(runtime)
    # Each entry published once by exactly one of them.
    assert first.published_entries + second.published_entries == head
