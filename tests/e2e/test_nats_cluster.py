"""The service on a three-node JetStream cluster with R3 streams (issue 19): the node leading the
ledger stream is SIGKILLed in the middle of a load; the stream's leadership moves to another
node, and the read model gets every event exactly once (0 lost, 0 doubled)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import nats
import psycopg
import pytest
from psycopg import sql

from adapters.usage_writer import UsageWriter, encode_usage
from domain.records import KeyRecord
from domain.services.catalogue import CatalogueService
from domain.usage import UsageFact
from infra.wiring import Runtime
from tests.conftest import close_nats, make_settings, running, tracked, wait_until
from tests.nats_cluster import Cluster, nats_cluster

pytestmark = pytest.mark.anyio
METRIC = "cluster_calls"
BATCHES = 60
EVENTS_PER_BATCH = 250
KILL_AFTER_BATCHES = 20
LOAD_DEADLINE_S = 60.0
REPLICAS = 3
CLUSTER_READY_S = 30.0
LEADER_MOVE_S = 30.0
CATCH_UP_S = 60.0
NATS_TIMEOUT_S = 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with nats_cluster(tmp_path / "nats") as c:
        yield c


@pytest.fixture
def cluster_runtime(tmp_path: Path, server_urls: tuple[str, str],
                    cluster: Cluster) -> Iterator[Runtime]:
    db, _ = server_urls
    settings = dataclasses.replace(make_settings(tmp_path), stream_replicas=REPLICAS)
    rt = Runtime.open(settings, db, cluster.url)
    try:
        yield rt
    finally:
        rt.pool.close()
        rt.ledger.close()
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(settings.pg_schema)))


async def _stream_leader(cluster: Cluster, stream: str, exclude: str | None = None) -> str | None:
    """The node leading `stream`, asked of any live node (None while there is none)."""
    for node in cluster.nodes:
        if node.name == exclude:
            continue
        try:
            nc = await nats.connect(node.url, connect_timeout=NATS_TIMEOUT_S, max_reconnect_attempts=0,
                                    allow_reconnect=False)
        except Exception:
            continue
        try:
            info = await nc.jetstream(timeout=NATS_TIMEOUT_S).stream_info(stream)
            leader = info.cluster.leader if info.cluster else None
            replicas = len(info.cluster.replicas or []) + 1 if info.cluster else 0
            if leader and replicas == REPLICAS:
                return str(leader)
        except Exception:
            continue
        finally:
            await nc.close()
    return None


def _counted(rt: Runtime, project: str) -> int:
    with rt.pool.connection() as conn:
        row = conn.execute("SELECT COALESCE(sum(count), 0) FROM usage_totals WHERE metric = %s"
                           " AND granularity = 'month' AND project_id = %s",
                           (METRIC, project)).fetchone()
    return int(row[0]) if row else 0


async def test_losing_the_stream_leader_mid_load_moves_leadership_and_loses_and_doubles_nothing(
    cluster: Cluster, cluster_runtime: Runtime
) -> None:
    rt = cluster_runtime
    CatalogueService(rt.ledger, lambda: datetime.now(UTC), uuid4).define_meter(
        code=METRIC, name="calls", aggregation="count", field=None, group_by=[],
        allow_negative=False, has_usage=lambda _: False, actor=None)
    key = KeyRecord(uuid4(), "p", "h", uuid4(), uuid4(), "Asia/Kolkata", None, False)
    now = datetime.now(UTC)
    writer = UsageWriter(rt.database_url, rt.settings.pg_schema)
    accepted = killed = 0
    victim = ""
    try:
        async with running(rt, {"relay", "project"}):
            first = await wait_until(lambda: asyncio.run(_stream_leader(cluster, rt.streams.ledger)),
                                     "the ledger stream at R3 with a leader", CLUSTER_READY_S)
            loop_end = asyncio.get_running_loop().time() + LOAD_DEADLINE_S
            for b in range(BATCHES):
                if asyncio.get_running_loop().time() > loop_end:
                    break
                if b == KILL_AFTER_BATCHES:
                    victim = await _stream_leader(cluster, rt.streams.ledger) or first
                    cluster.node(victim).kill()
                    killed = b
                rows = [encode_usage(key, UsageFact(f"e{b}-{i}", METRIC, Decimal(1), now, {}), now)
                        for i in range(EVENTS_PER_BATCH)]
                # every other batch resends its predecessor's last event: a duplicate, not counted
                if b:
                    rows.append(encode_usage(key, UsageFact(
                        f"e{b - 1}-{EVENTS_PER_BATCH - 1}", METRIC, Decimal(1), now, {}), now))
                appended = await writer.append(rows)
                accepted += appended.accepted
            assert killed == KILL_AFTER_BATCHES, "the load ended before the node was killed"
            moved = await wait_until(
                lambda: asyncio.run(_stream_leader(cluster, rt.streams.ledger, exclude=victim)),
                "a new leader of the ledger stream", LEADER_MOVE_S)
            head = rt.ledger.head()
            await wait_until(lambda: tracked(rt, "usage_totals") >= head,
                             "usage totals at the ledger head", CATCH_UP_S)
            counted = _counted(rt, str(key.project_id))
    finally:
        await writer.stop()
        await close_nats(rt)
    print(f"killed {victim} (leader at start: {first}) after {killed} batches; new leader {moved}; "
          f"{accepted} accepted, {counted} counted")
    assert moved != victim, f"the leadership stayed on the killed node {victim}"
    assert accepted == BATCHES * EVENTS_PER_BATCH, "a resend was accepted as new, or a batch lost"
    assert counted == accepted, f"{counted} counted of {accepted} accepted: lost or doubled"
