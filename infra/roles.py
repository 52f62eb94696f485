"""Process roles: `serve` (everything in one process) or one of api / relay / project."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from adapters.payment_manager import PaymentManager
from adapters.projector import Projector
from adapters.relay import Relay
from adapters.sealer import Sealer
from api.app import create_app
from infra.http_protocol import CoalescingHttpToolsProtocol
from infra.scheduler import start as start_scheduler
from infra.wiring import READ_MODELS, ApiRole, Runtime, admin_token, build_api

log = logging.getLogger("billing.roles")

SHUTDOWN_TIMEOUT_S = 15.0
HTTP_GRACEFUL_SHUTDOWN_S = 5  # requests in flight at stop: how long uvicorn lets them finish
LISTEN_BACKLOG = 2048
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: the role runner owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket. `serve` hands it to its extra API processes (inherited fd):
    they all accept from it, and a second service on the same port fails to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def run_roles(
    rt: Runtime, roles: set[str], stop: asyncio.Event | None = None, *, signals: bool = True,
    sock: socket.socket | None = None, tune_gc: bool = False, api: ApiRole | None = None,
) -> None:
    """Run the given roles until SIGINT/SIGTERM (or `stop`), then shut down in order. `api`: the
    API role, built by the caller (build_api) when it wants to look inside; built here otherwise."""
    stop = stop or asyncio.Event()
    if signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    js = await rt.connect_nats(f"billing-{'-'.join(sorted(roles))}")
    jobs: list[Coroutine[Any, Any, None]] = []
    server: _Server | None = None
    scheduler: AsyncIOScheduler | None = None
    if "relay" in roles:
        relay = Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, js, rt.streams)
        jobs.append(relay.run(stop))
    if "project" in roles:
        for model in READ_MODELS:
            projector = Projector(model, rt.ledger, rt.projection_pool(), js, rt.streams)
            jobs.append(projector.run(stop))
        # Workers also apply recorded gateway deliveries (docs/PAYMENTS.md, the process manager).
        jobs.append(PaymentManager(rt.ledger, rt.pool, rt.payments()).run(stop))
        # ...and send the tenant webhook outbox (docs/WEBHOOKS.md).
        jobs.append(rt.tenant_webhook_sender().run(stop))
    if "seal" in roles:
        jobs.append(Sealer(rt.database_url, rt.settings.pg_schema, rt.ledger.channel, js, rt.streams,
                           events_table=rt.ledger.events_table).run(stop))
    if "scheduler" in roles:
        scheduler = start_scheduler(rt)
    api = (api or build_api(rt, admin_token=admin_token(rt.settings))) if "api" in roles else None
    try:
        if api is not None:
            _, asgi = create_app(api.deps)
            jobs += await api.start(stop)
            server = _Server(uvicorn.Config(
                asgi, host=rt.settings.host, port=rt.settings.port, log_config=None,
                lifespan="off", access_log=False, timeout_graceful_shutdown=HTTP_GRACEFUL_SHUTDOWN_S,
                # api/client_ip.py decides whom to believe (trusted proxies), not uvicorn.
                proxy_headers=False, http=CoalescingHttpToolsProtocol,  # one send per response
                server_header=False,  # names the software to anyone who asks; one header less
            ))
            sock = sock or listen_socket(rt.settings.host, rt.settings.port)
            jobs.append(server.serve(sockets=[sock]))
        if tune_gc:
            # Everything built so far lives as long as the process: keep it out of the collector's
            # full passes (shorter pauses, a steadier p99), and collect the young less often.
            # Only for a process that runs its roles once (the CLI), not for tests that start many.
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info("started", extra={"roles": sorted(roles), "host": rt.settings.host,
                                   "port": rt.settings.port})
        await _supervise(jobs, stop, server, scheduler)
    finally:
        if api is not None:
            await api.close()  # after the server: the writer answers what it still holds
    log.info("stopped")


async def _supervise(jobs: list[Coroutine[Any, Any, None]], stop: asyncio.Event,
                     server: _Server | None, scheduler: AsyncIOScheduler | None) -> None:
    """Run the jobs until `stop` or the first to end, then stop the others, bounded."""
    tasks = [asyncio.create_task(job) for job in jobs]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopper and task.exception():
            log.error("a role failed", exc_info=task.exception())
    stop.set()
    if server is not None:
        server.should_exit = True
    if scheduler is not None:
        scheduler.shutdown(wait=False)
    if tasks:  # none in a scheduler-only process (asyncio.wait refuses an empty set)
        await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT_S)
    stopper.cancel()
    for task in tasks:
        task.cancel()
