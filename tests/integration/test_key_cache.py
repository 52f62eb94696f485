"""The API processes' key and token caches follow their read models, even when those read
models' projectors commit at different times (issue 14, defect 1).

Each test runs the relay and one projector per read model itself, so that it can hold one
projector back while the other carries on: what happens in production when one projector is
slow, restarting or retrying. Two caches stand for two API processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import pytest
from nats.js import JetStreamContext
from psycopg import Connection

from adapters import caches
from adapters.caches import KeyCache, PrefixCache
from adapters.maintenance import redrive
from adapters.projector import Projector
from adapters.relay import Relay
from domain.api_key import ApiKey
from domain.organisation import OrganisationSettings
from domain.records import KeyRecord, TokenRecord
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from domain.services.organisations import OrganisationService
from infra.wiring import Runtime, new_key_secret, read_model
from projections import catalogue as catalogue_model
from projections.base import ReadModel
from tests.conftest import close_nats, reached, wait_until

pytestmark = pytest.mark.anyio

REVOCATION_BOUND_S = 5.0  # docs/API.md: a revoked key stops working on every replica within 5 s
STOP_WAIT_S = 15.0
RACE_WAIT_S = 10.0  # how long a test waits for a thread it holds back to reach its hold point
API_PROCESSES = 2
FOLLOWED = ("organisations", "catalogue", "access")
ROTATION_OVERLAP = timedelta(hours=1)  # the old key's life after a rotation
ALLOW_LIST = "10.0.0.0/8"
HANDLER_RETRIES_S = (0.01, 0.02, 0.04)  # a failing handler is dead-lettered quickly


class Pipeline:
    """The relay and one projector per read model, each started and stopped on its own."""

    def __init__(self, rt: Runtime, js: JetStreamContext) -> None:
        self._rt = rt
        self._js = js
        self._running: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}

    def start(self, name: str, model: ReadModel | None = None) -> None:
        rt = self._rt
        job: Relay | Projector
        if name == "relay":
            job = Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, self._js, rt.streams)
        else:
            job = Projector(model or read_model(name), rt.ledger, rt.projection_pool(), self._js,
                            rt.streams, retry_backoff_s=HANDLER_RETRIES_S)
        stop = asyncio.Event()
        self._running[name] = (stop, asyncio.create_task(job.run(stop)))

    async def stop(self, name: str) -> None:
        stop, task = self._running.pop(name)
        stop.set()
        await asyncio.wait_for(task, STOP_WAIT_S)

    async def close(self) -> None:
        for name in list(self._running):
            await self.stop(name)


@contextlib.asynccontextmanager
async def pipeline(rt: Runtime) -> AsyncIterator[Pipeline]:
    js = await rt.connect_nats("test-key-cache")
    pipe = Pipeline(rt, js)
    try:
        pipe.start("relay")
        for name in FOLLOWED:
            pipe.start(name)
        yield pipe
    finally:
        await pipe.close()
        await close_nats(rt)


@contextlib.asynccontextmanager
async def following(*cache_list: Any) -> AsyncIterator[None]:
    """The caches' own refresh loops, as each API process runs them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in cache_list]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), STOP_WAIT_S)


@dataclasses.dataclass(frozen=True)
class Tenant:
    organisation_id: UUID
    key_id: UUID
    prefix: str
    position: int


def _clock() -> datetime:
    return datetime.now(UTC)


def orgs(rt: Runtime) -> OrganisationService:
    return OrganisationService(rt.ledger, _clock, uuid4)


def catalogue(rt: Runtime) -> CatalogueService:
    return CatalogueService(rt.ledger, _clock, uuid4)


def access(rt: Runtime) -> AccessService:
    return AccessService(rt.ledger, _clock, uuid4, new_key_secret)


def tenant(rt: Runtime, name: str) -> Tenant:
    """An organisation with a project and one API key."""
    org = orgs(rt).create(OrganisationSettings(name=name, billing_email=f"ap@{name}.example.in"), actor=None)
    project = catalogue(rt).create_project(org.aggregate.id, f"{name}-project", actor=None)
    key, _ = access(rt).issue_key(project.aggregate.id, f"{name}-key", None, actor=None)
    return Tenant(org.aggregate.id, key.aggregate.id, key.aggregate.prefix, key.position)


async def two_tenants(rt: Runtime) -> tuple[Tenant, Tenant]:
    """Tenants a and b, projected."""
    a = await asyncio.to_thread(tenant, rt, "a")
    b = await asyncio.to_thread(tenant, rt, "b")
    await projected(rt, "catalogue", b.position)
    return a, b


def api_processes(rt: Runtime) -> list[PrefixCache[KeyRecord]]:
    """The key caches of API_PROCESSES separate API processes (each has its own)."""
    return [KeyCache(rt.pool) for _ in range(API_PROCESSES)]


async def projected(rt: Runtime, name: str, position: int) -> None:
    await wait_until(partial(reached, rt, name, position), f"{name} at {position}")


def seen(loop: asyncio.AbstractEventLoop, cache: PrefixCache[Any], prefix: str) -> Any:
    """What an API process's cache answers for `prefix` (called from wait_until's thread)."""
    record = asyncio.run_coroutine_threadsafe(cache.find(prefix), loop).result(STOP_WAIT_S)
    assert record is not None, f"{prefix} is unknown to the cache"
    return record


async def found(cache: PrefixCache[Any], prefix: str) -> Any:
    record = await cache.find(prefix)
    assert record is not None, f"{prefix} is unknown to the cache"
    return record


def everywhere(loop: asyncio.AbstractEventLoop, cache_list: list[PrefixCache[KeyRecord]],
               prefix: str, holds: Callable[[KeyRecord], bool]) -> bool:
    return all(holds(seen(loop, c, prefix)) for c in cache_list)


@dataclasses.dataclass(frozen=True)
class Overtaken:
    """A change to tenant a that the `lagging` projector applies, and a later change to tenant b
    in the other read model, which its projector commits first."""

    lagging: str
    held_back: Callable[[Runtime, Tenant], int]
    applied: Callable[[KeyRecord], bool]
    overtaking: Callable[[Runtime, Tenant], int]
    overtaking_applied: Callable[[KeyRecord], bool]


def _revoke(rt: Runtime, t: Tenant) -> int:
    return access(rt).revoke_key(t.key_id, actor=None).position


def _rotate(rt: Runtime, t: Tenant) -> int:
    return access(rt).rotate_key(t.key_id, ROTATION_OVERLAP, actor=None)[0].position


def _suspend(rt: Runtime, t: Tenant) -> int:
    return orgs(rt).update_settings(t.organisation_id, OrganisationSettings(), suspended=True,
                                    reason="unpaid", actor=None).position


def _allow_list(rt: Runtime, t: Tenant) -> int:
    return orgs(rt).update_settings(t.organisation_id, OrganisationSettings(allowed_ips=ALLOW_LIST),
                                    actor=None).position


def _revoked(k: KeyRecord) -> bool:
    return k.revoked


def _listed(k: KeyRecord) -> bool:
    return k.organisation_allowed_ips == ALLOW_LIST


OVERTAKEN = {
    "revocation-behind-an-organisation-change": Overtaken(
        "catalogue", _revoke, _revoked, _allow_list, _listed),
    "rotation-expiry-behind-an-organisation-change": Overtaken(
        "catalogue", _rotate, lambda k: k.expires_at is not None, _allow_list, _listed),
    "suspension-behind-a-key-revocation": Overtaken(
        "organisations", _suspend, lambda k: k.suspended, _revoke, _revoked),
    "allow-list-behind-a-key-revocation": Overtaken(
        "organisations", _allow_list, _listed, _revoke, _revoked),
}


@pytest.mark.parametrize("case", OVERTAKEN.values(), ids=OVERTAKEN.keys())
async def test_a_change_held_back_by_a_lagging_projector_reaches_every_api_process_within_5s(
    runtime: Runtime, case: Overtaken,
) -> None:
    """Tenant a changes at p, tenant b at q > p in the other read model, and b's projector
    commits q while a's (the lagging one) is stopped. Every cache sees q first; the change at p
    must still reach every API process within 5 s of the lagging projector resuming."""
    loop = asyncio.get_running_loop()
    async with pipeline(runtime) as pipe:
        a, b = await two_tenants(runtime)
        processes = api_processes(runtime)
        async with following(*processes):
            await wait_until(partial(everywhere, loop, processes, a.prefix,
                                     lambda k: not case.applied(k)), "tenant a in every cache")
            await wait_until(partial(everywhere, loop, processes, b.prefix,
                                     lambda k: not case.overtaking_applied(k)),
                             "tenant b in every cache")
            await pipe.stop(case.lagging)
            held_back = await asyncio.to_thread(case.held_back, runtime, a)
            later = await asyncio.to_thread(case.overtaking, runtime, b)
            assert later > held_back
            ahead = "organisations" if case.lagging == "catalogue" else "catalogue"
            await projected(runtime, ahead, later)
            # b's record was cached before, so only a refresh past q changes it.
            await wait_until(partial(everywhere, loop, processes, b.prefix, case.overtaking_applied),
                             "the later change in every cache")
            assert not any([case.applied(await found(c, a.prefix)) for c in processes])

            pipe.start(case.lagging)
            await wait_until(partial(everywhere, loop, processes, a.prefix, case.applied),
                             "the held-back change in every API process", REVOCATION_BOUND_S)


async def test_an_organisation_allow_list_reaches_the_caches_while_the_catalogue_projector_lags(
    runtime: Runtime,
) -> None:
    """A stopped catalogue projector holds back only the catalogue's changes: an organisation's
    allow-list and suspension still reach every API process, and the revocation it holds back
    follows within 5 s of it resuming."""
    loop = asyncio.get_running_loop()
    async with pipeline(runtime) as pipe:
        a = await asyncio.to_thread(tenant, runtime, "a")
        await projected(runtime, "catalogue", a.position)
        processes = api_processes(runtime)
        async with following(*processes):
            await wait_until(partial(everywhere, loop, processes, a.prefix, lambda k: True),
                             "the key in every cache")
            await pipe.stop("catalogue")
            await asyncio.to_thread(access(runtime).revoke_key, a.key_id, actor=None)  # held back
            await asyncio.to_thread(orgs(runtime).update_settings, a.organisation_id,
                                    OrganisationSettings(allowed_ips="192.0.2.0/24"), suspended=True,
                                    reason="audit", actor=None)
            await wait_until(
                partial(everywhere, loop, processes, a.prefix,
                        lambda k: k.organisation_allowed_ips == "192.0.2.0/24" and k.suspended),
                "the allow-list and suspension in every API process", REVOCATION_BOUND_S)
            assert not any([(await found(c, a.prefix)).revoked for c in processes])
            pipe.start("catalogue")
            await wait_until(partial(everywhere, loop, processes, a.prefix, lambda k: k.revoked),
                             "the revocation in every API process", REVOCATION_BOUND_S)


def _failing_revocation_of(key_id: UUID) -> ReadModel:
    """The catalogue, except that revoking `key_id` fails: a bug fixed later, by a re-drive."""
    revoked = catalogue_model.READ_MODEL.handlers[ApiKey.Revoked]

    def maybe_fail(cur: Any, event: Any, position: int) -> None:
        if event.originator_id == key_id:
            raise ValueError("cannot project this revocation")
        revoked(cur, event, position)

    healthy = catalogue_model.READ_MODEL
    return ReadModel(name=healthy.name, ddl=healthy.ddl, tables=healthy.tables,
                     handlers={**healthy.handlers, ApiKey.Revoked: maybe_fail})


async def test_a_revocation_applied_by_a_redrive_reaches_every_api_process_within_5s(
    runtime: Runtime,
) -> None:
    """A re-drive applies a dead-lettered revocation below the catalogue's tracking position,
    which the caches have already passed: they must notice and reload."""
    loop = asyncio.get_running_loop()
    async with pipeline(runtime) as pipe:
        a, b = await two_tenants(runtime)
        await pipe.stop("catalogue")
        pipe.start("catalogue", _failing_revocation_of(a.key_id))
        processes = api_processes(runtime)
        async with following(*processes):
            await wait_until(partial(everywhere, loop, processes, a.prefix, lambda k: True),
                             "the key in every cache")
            await asyncio.to_thread(_revoke, runtime, a)  # dead-lettered
            later = await asyncio.to_thread(_revoke, runtime, b)
            await projected(runtime, "catalogue", later)
            await wait_until(partial(everywhere, loop, processes, b.prefix, _revoked),
                             "the later revocation in every cache")
            assert not any([(await found(c, a.prefix)).revoked for c in processes])

            result = await asyncio.to_thread(redrive, runtime.pool, runtime.ledger,
                                             catalogue_model.READ_MODEL)
            assert len(result.applied) == 1
            await wait_until(partial(everywhere, loop, processes, a.prefix, _revoked),
                             "the re-driven revocation in every API process", REVOCATION_BOUND_S)


def _lose_catalogue_commits(rt: Runtime, after: int, tenants: list[Tenant]) -> None:
    """What a Postgres crash does to commits made without waiting for the WAL flush (the
    projectors' pool): the catalogue's changes after `after` (here: the tenants' revocations)
    and its tracking go back, together."""
    with rt.pool.connection() as conn, conn.transaction():
        for t in tenants:
            conn.execute("UPDATE api_keys SET revoked_at = NULL, ledger_position = %s WHERE id = %s",
                         (t.position, t.key_id))
        conn.execute("UPDATE projection_tracking SET position = %s WHERE name = 'catalogue'",
                     (after,))


async def test_the_caches_follow_a_read_model_whose_tracking_went_back(runtime: Runtime) -> None:
    """The catalogue loses its last commits while the organisations carry on: an organisation
    change must still reach every cache, and the lost revocations must come back to all of them
    once the catalogue projector applies them again."""
    loop = asyncio.get_running_loop()
    async with pipeline(runtime) as pipe:
        a, b = await two_tenants(runtime)
        processes = api_processes(runtime)
        async with following(*processes):
            first = await asyncio.to_thread(_revoke, runtime, a)
            await asyncio.to_thread(_revoke, runtime, b)
            for t in (a, b):
                await wait_until(partial(everywhere, loop, processes, t.prefix, _revoked),
                                 "the revocations in every cache")
            await pipe.stop("catalogue")
            await asyncio.to_thread(_lose_catalogue_commits, runtime, first - 1, [a, b])
            await asyncio.to_thread(_suspend, runtime, b)
            await wait_until(partial(everywhere, loop, processes, b.prefix,
                                     lambda k: k.suspended),
                             "the suspension in every API process", REVOCATION_BOUND_S)

            pipe.start("catalogue")
            c = await asyncio.to_thread(tenant, runtime, "c")  # its messages fill the gap
            await projected(runtime, "catalogue", c.position)
            for t in (a, b):
                await wait_until(partial(everywhere, loop, processes, t.prefix, _revoked),
                                 "the revocations again in every API process",
                                 REVOCATION_BOUND_S)


class HeldRead:
    """Wraps a real by-prefix query: the read happens, then its answer is held back until the
    test releases it, so that a refresh can overtake it."""

    def __init__(self, query: Callable[[Connection[Any], str], Any]) -> None:
        self._query = query
        self.read = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: Connection[Any], prefix: str) -> Any:
        row = self._query(conn, prefix)
        self.read.set()
        assert self.release.wait(RACE_WAIT_S), "the test never released the held read"
        return row


async def test_a_cache_miss_read_before_a_revocation_never_overwrites_the_refreshed_record(
    runtime: Runtime,
) -> None:
    async with pipeline(runtime):
        a = await asyncio.to_thread(tenant, runtime, "a")
        await projected(runtime, "catalogue", a.position)
        held = HeldRead(caches.KEYS.by_prefix)
        cache: PrefixCache[KeyRecord] = PrefixCache(runtime.pool,
                                                    dataclasses.replace(caches.KEYS, by_prefix=held))
        miss = asyncio.create_task(cache.find(a.prefix))  # reads the key as valid, then waits
        assert await asyncio.to_thread(held.read.wait, RACE_WAIT_S)
        revoked = await asyncio.to_thread(access(runtime).revoke_key, a.key_id, actor=None)
        await projected(runtime, "catalogue", revoked.position)
        await asyncio.to_thread(cache.refresh)  # sees the revocation, passes its position
        held.release.set()
        await asyncio.wait_for(miss, RACE_WAIT_S)  # the older read finishes last
        await asyncio.to_thread(cache.refresh)
        record = await cache.find(a.prefix)
        assert record is not None and record.revoked


async def test_a_token_cache_miss_read_before_a_revocation_never_overwrites_the_refreshed_record(
    runtime: Runtime,
) -> None:
    async with pipeline(runtime):
        access = AccessService(runtime.ledger, _clock, uuid4, new_key_secret)
        issued, _ = await asyncio.to_thread(access.issue_token, role="auditor", organisation_id=None,
                                            name="ops", expires_at=None, actor=None)
        await projected(runtime, "access", issued.position)
        held = HeldRead(caches.TOKENS.by_prefix)
        cache: PrefixCache[TokenRecord] = PrefixCache(
            runtime.pool, dataclasses.replace(caches.TOKENS, by_prefix=held))
        prefix = issued.aggregate.prefix
        miss = asyncio.create_task(cache.find(prefix))
        assert await asyncio.to_thread(held.read.wait, RACE_WAIT_S)
        revoked = await asyncio.to_thread(access.revoke_token, issued.aggregate.id, actor=None)
        await projected(runtime, "access", revoked.position)
        await asyncio.to_thread(cache.refresh)
        held.release.set()
        await asyncio.wait_for(miss, RACE_WAIT_S)
        await asyncio.to_thread(cache.refresh)
        record = await cache.find(prefix)
        assert record is not None and record.revoked
