"""The `billing` command: process roles and operator tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import getpass
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO
from uuid import UUID, uuid4, uuid5

import msgspec
import uvloop
from tqdm import tqdm

from adapters import bookkeeping
from adapters.maintenance import rebuild, redrive
from adapters.schedule import job_record
from domain.access import PRINCIPAL_ROLES
from domain.audit import Actor
from domain.errors import DomainError, NotFound, ValidationFailed
from domain.organisation import OrganisationSettings
from domain.payment import GatewayEvent, gateway_event_ref
from domain.period import due_periods, parse_period
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from domain.services.organisations import OrganisationService
from domain.services.payments import FAILED, PaymentsService
from infra import ledger_cli, logs
from infra.embedded import embedded_servers
from infra.reconcile import add_reconcile_parser, reconcile_command, reconciliation_status
from infra.roles import listen_socket, run_roles
from infra.scheduler import CATCH_UP_PERIODS, INVOICE_RUN_EVERY_MIN, INVOICE_RUN_JOB
from infra.service_data import missing_ledger
from infra.settings import Settings, from_env
from infra.wiring import READ_MODELS, Runtime, new_key_secret, read_model, servers
from projections import invoice_runs as invoice_run_records

GIL_SWITCH_INTERVAL_S = 0.0005
CHILD_POLL_S = 1.0
BACKGROUND_NICENESS = 5  # relay and projectors: a second of visibility budget, not 50 ms
CHILD_STOP_TIMEOUT_S = 20.0
NO_DATA_EXIT = 3  # an operator command found no service data (no database to work on)
EMBEDDED_PG_DIR = "pg"  # under the data folder: where infra.embedded keeps Postgres's cluster
log = logging.getLogger("billing.cli")
CLI_NAMESPACE = UUID("5a0c7f4e-3b61-4c2b-8f0e-6d7a9c1e2b01")
# The failed deliveries, from the gateway_events read model (projections/payments.py owns the
# table; this one operator query lives with its only user). The read model may lag the ledger by
# a moment: a delivery re-applied a moment ago can still be listed, and applying it again with
# again=True changes nothing (only a `failed` one is applied afresh).
# The invoices of the latest periods, from the invoices read model (projections/invoices.py owns
# the table): how many each period's runs drafted, and when the latest was. A run that drafted
# nothing new leaves no trace here; its blocked organisations are in invoice_run_blocked.
INVOICE_PERIODS_SQL = ("SELECT period, count(*), max(created_at) FROM invoices"
                       " GROUP BY period ORDER BY period DESC LIMIT %s")
STATUS_PERIODS_MAX = 3  # `billing status`: the latest periods it shows invoice runs for
# `billing status`: a scheduler writes its next run time as it submits a run; a time this far in
# the past means no scheduler is running the invoice run.
SCHEDULE_LATE_S = 120
FAILED_DELIVERIES_SQL = ("SELECT id, event_id, event_type, detail FROM gateway_events"
                         " WHERE outcome = 'failed' ORDER BY received_at, id")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="billing", description="Usage-billing ledger")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run every role: the API and the scheduler here, the relay and "
                   "projectors in a worker process, and BILLING_API_PROCESSES - 1 more API processes")
    api = sub.add_parser("api", help="run the HTTP API only")
    api.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # given by `serve`
    for role, text in (("relay", "run the ledger relay only (one active, others standby)"),
                       ("project", "run the projectors only"),
                       ("worker", "run the relay and the projectors in one process"),
                       ("scheduler", "run the scheduler only: invoice runs and daily jobs (each "
                                     "under an advisory lock: several schedulers never double)")):
        # `serve` lowers its background roles' priority: under CPU pressure the API answers first.
        sub.add_parser(role, help=text).add_argument("--niceness", type=int, default=0,
                                                     help=argparse.SUPPRESS)
    proj = sub.add_parser("projections", help="read models").add_subparsers(dest="action", required=True)
    proj.add_parser("status", help="position, lag and dead letters of every read model")
    sub.add_parser("status", help="read models' lag and dead letters, and the organisations the "
                   "last invoice run of each period could not invoice")
    rb = proj.add_parser("rebuild", help="drop one read model and replay it from position 0")
    rb.add_argument("name", choices=[m.name for m in READ_MODELS])
    admin = sub.add_parser("admin", help="admin principals").add_subparsers(dest="action", required=True)
    tok = admin.add_parser("create-token", help="print a new admin token (shown once)")
    tok.add_argument("--role", required=True, choices=PRINCIPAL_ROLES)
    tok.add_argument("--organisation", help="organisation id, for org_admin / org_viewer",
                     type=_ident)
    tok.add_argument("--name", default="created with the CLI")
    orgs = sub.add_parser("orgs", help="organisations").add_subparsers(dest="action", required=True)
    oc = orgs.add_parser("create", help="create an organisation; prints its id")
    oc.add_argument("--name", required=True)
    oc.add_argument("--billing-email", required=True)
    oc.add_argument("--state-code")
    oc.add_argument("--gstin")
    projects = sub.add_parser("projects", help="an organisation's projects").add_subparsers(
        dest="action", required=True)
    pc = projects.add_parser("create", help="create a project of an organisation; prints its id")
    pc.add_argument("--organisation", required=True, help="organisation id", type=_ident)
    pc.add_argument("--name", required=True)
    keys = sub.add_parser("keys", help="project API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="print a new API key for a project (shown once)")
    kc.add_argument("--project", required=True, help="project id", type=_ident)
    kc.add_argument("--name", default="created with the CLI")
    kr = keys.add_parser("revoke", help="revoke an API key")
    kr.add_argument("key_id", type=_ident)
    inv = sub.add_parser("invoices", help="invoices").add_subparsers(dest="action", required=True)
    ir = inv.add_parser("run", help="draft every subscribed organisation's invoice for a period")
    ir.add_argument("--period", required=True, help="YYYY-MM")
    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="action", required=True)
    for action in ("list", "redrive"):
        a = dlq.add_parser(action)
        a.add_argument("--projection", choices=[m.name for m in READ_MODELS])
    pay = sub.add_parser("payments", help="Razorpay deliveries that could not be applied").add_subparsers(
        dest="action", required=True)
    pay.add_parser("failed", help="list the deliveries the process manager recorded as failed "
                   "(JSON lines: id, event_id, event_type, detail)")
    ra = pay.add_parser("reapply", help="apply the failed deliveries afresh, after the fault that "
                        "failed them was fixed; prints each one's new outcome; exit 1 if any still fails")
    ra.add_argument("--event-id", help="only this delivery (its X-Razorpay-Event-Id, or the id it "
                    "was recorded under)")
    sub.add_parser("seal", help="run the ledger sealer only (one active, others standby)")
    ledger_cli.add_parsers(sub)
    add_reconcile_parser(sub)
    return p


def _run_roles(settings: Settings, roles: set[str], *, with_children: bool = False,
               listen_fd: int | None = None) -> int:
    with servers(settings) as (db, nats):
        rt = Runtime.open(settings, db, nats)
        sock = socket.socket(fileno=listen_fd) if listen_fd is not None else None
        children: list[subprocess.Popen[bytes]] = []
        if with_children:
            sock = listen_socket(settings.host, settings.port)
            # The relay and the projectors in a worker process of their own, at a lower priority:
            # the API's interpreters are theirs to share with nobody. (One worker, not one per
            # role: that memory is better spent on a second API process.)
            children.append(_start_child(db, nats, ["worker", "--niceness",
                                                    str(BACKGROUND_NICENESS)]))
            children += [_start_child(db, nats, ["api", "--listen-fd", str(sock.fileno())],
                                      pass_fds=(sock.fileno(),))
                         for _ in range(settings.api_processes - 1)]
        stop = asyncio.Event()
        child_died = False

        async def watch_children() -> None:
            nonlocal child_died
            while all(c.poll() is None for c in children) and not stop.is_set():
                await asyncio.sleep(CHILD_POLL_S)
            if not stop.is_set():
                dead = [c for c in children if c.poll() is not None]
                args = dead[0].args  # as _start_child gave them: [python, -m, module, role...]
                role = " ".join(map(str, args[3:])) if isinstance(args, list) else str(args)
                log.error("a child process (%s) exited with %s; stopping", role, dead[0].returncode)
                child_died = True
                stop.set()

        async def main() -> None:
            watcher = asyncio.create_task(watch_children()) if children else None
            try:
                await run_roles(rt, roles, stop, sock=sock, tune_gc=True)
            finally:
                stop.set()
                if watcher:
                    await watcher
                await rt.close()

        try:
            # uvloop: a faster event loop for the HTTP server, NATS and psycopg's async connections.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        finally:
            for child in children:
                _stop_child(child)
    return 1 if child_died else 0


def _start_child(database_url: str, nats_url: str, command: list[str],
                 pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """A child of `serve`: the worker (relay and projectors, so the API keeps its core) or
    another API process accepting from the same socket."""
    env = dict(os.environ) | {"DATABASE_URL": database_url, "NATS_URL": nats_url}
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *command], env=env,
                            pass_fds=pass_fds, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM when `serve` dies, even by SIGKILL (no orphans)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(CHILD_STOP_TIMEOUT_S)


def _missing_data(settings: Settings) -> str | None:
    """Why an operator command has no service data to work on (None when it has): neither
    DATABASE_URL nor an embedded Postgres cluster in the data folder."""
    if settings.database_url or (settings.data_dir / EMBEDDED_PG_DIR / "PG_VERSION").is_file():
        return None
    return (f"no billing data in {settings.data_dir} (no embedded Postgres there) and "
            "DATABASE_URL is not set. Run this command from the folder where `make run` runs "
            "(its data is ./.data there), or set BILLING_DATA_DIR (or DATABASE_URL) to the "
            "service's.")


@contextlib.contextmanager
def _service_database(settings: Settings) -> Iterator[str]:
    """The service's database for an operator command: DATABASE_URL, or the embedded Postgres
    of the data folder, attached to while `serve` runs (else started for the command and
    stopped after). Never a new cluster (_missing_data is checked first): a command on an empty
    one would report a healthy, empty ledger and write where the service never reads."""
    if settings.database_url:
        yield settings.database_url
        return
    with embedded_servers(settings.data_dir, need_pg=True, need_nats=False) as (pg, _):
        assert pg is not None
        yield pg.url


def _operator(settings: Settings, args: argparse.Namespace) -> int:
    if (missing := _missing_data(settings)) is not None:
        sys.stderr.write(f"billing: {missing}\n")
        return NO_DATA_EXIT
    with _service_database(settings) as db:
        if (no_ledger := missing_ledger(db, settings.pg_schema)) is not None:
            sys.stderr.write(f"billing: {no_ledger}\n")
            return NO_DATA_EXIT
        # The operator commands read and write the ledger and the read models; none needs NATS.
        rt = Runtime.open(settings, db, settings.nats_url or "")
        try:
            return _operate(rt, args)
        finally:
            rt.close_gateway()
            rt.pool.close()
            rt.ledger.close()


def _operate(rt: Runtime, args: argparse.Namespace) -> int:
    out = sys.stdout
    if (invalid := _invalid_arguments(args)) is not None:
        sys.stderr.write(f"billing: {invalid}\n")
        return 2
    if args.command in ("ledger", "archive"):
        return ledger_cli.operate(rt, args, out)
    if args.command in ("admin", "orgs", "projects", "keys"):
        return _tenant_command(rt, args)
    if args.command == "invoices":
        return _invoice_run(rt, args.period)
    if args.command == "payments":
        return _payments_command(rt, args, out)
    if args.command == "reconcile":
        return reconcile_command(rt, args, out, _local_operator())
    if args.command == "status" or (args.command == "projections" and args.action == "status"):
        return _status(rt, out)
    if args.command == "projections" and args.action == "rebuild":
        model = read_model(args.name)
        with tqdm(total=max(rt.ledger.head(), 1), unit="pos", desc=f"rebuild {model.name}",
                  file=sys.stderr) as bar:
            def progress(position: int, head: int) -> None:
                bar.total = max(head, 1)
                bar.n = position
                bar.refresh()

            position = rebuild(rt.pool, rt.ledger, model, progress)
        out.write(f"{model.name} rebuilt up to ledger position {position}\n")
        return 0
    names = [args.projection] if args.projection else [m.name for m in READ_MODELS]
    if args.action == "list":
        listed = 0
        with rt.pool.connection() as conn:
            for name in names:
                for row in bookkeeping.dead_letters(conn, name):
                    out.write(msgspec.json.encode(row).decode() + "\n")
                    listed += 1
        if not listed:
            out.write("no dead letters\n")
        return 0
    failed = 0
    for name in names:
        result = redrive(rt.pool, rt.ledger, read_model(name))
        out.write(f"{name}: re-driven {len(result.applied)}, still failing "
                  f"{len(result.still_failing)}\n")
        for position, error in result.still_failing.items():
            out.write(f"  position {position}: {error}\n")
        failed += len(result.still_failing)
    return 1 if failed else 0


def _invalid_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments argparse accepted, checked before any server is started
    or any progress bar drawn; None when nothing is."""
    if args.command == "invoices":
        try:
            parse_period(args.period)
        except ValidationFailed as e:
            return str(e)
    if args.command == "reconcile" and args.period is not None:
        try:
            parse_period(args.period)
        except ValidationFailed as e:
            return str(e)
    return None


def _ident(value: str) -> str:
    """An id argument (a UUID), checked as the arguments are parsed, before any server is started:
    a mistyped id is a usage error (exit 2) naming its option, not a UUID parser's message."""
    try:
        return str(UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an id (ids are UUIDs, as `billing orgs create`, `projects create` "
            "and `keys create` print them)") from None


def _status(rt: Runtime, out: TextIO) -> int:
    """Read models, relay, dead letters, the invoice runs of the latest periods, every
    organisation a run left uninvoiced, and when the scheduler runs next: exit 1 if an
    organisation was left uninvoiced, so a cron check or a human sees it."""
    snap = rt.ops_snapshot()
    for name, pos in sorted(snap.projections.items()):
        out.write(f"{name}: position {pos}, lag {snap.ledger_head - pos}, "
                  f"dead letters {snap.dead_letters.get(name, 0)}\n")
    out.write(f"relay: position {snap.relay_position}, head {snap.ledger_head}, "
              f"lag {snap.ledger_head - snap.relay_position}\n")
    out.write(f"payments for review: {snap.payments_for_review} (GET /admin/v1/payments?review=true);"
              f" gateway deliveries failed: {snap.failed_deliveries} (`billing payments failed`;"
              " after a fix, `billing payments reapply`)\n")
    with rt.pool.connection() as conn:
        blocked = bookkeeping.blocked_organisations(conn)
        periods = conn.execute(INVOICE_PERIODS_SQL, (STATUS_PERIODS_MAX,)).fetchall()
    if not periods:
        out.write("invoice runs: none has drafted an invoice yet\n")
    for period, drafted, latest in periods:
        out.write(f"invoice run {period}: {drafted} invoices, latest drafted "
                  f"{latest.isoformat(timespec='minutes')}, "
                  f"blocked {snap.blocked.get(period, 0)}\n")
    for b in blocked:
        out.write(f"not invoiced for {b['period']}: {b['name']} ({b['organisation_id']}): "
                  f"dead-lettered entries {b['read_models']} (run of "
                  f"{b['recorded_at'].isoformat(timespec='minutes')}); fix, `billing dlq redrive`, "
                  "then run the period again\n")
    failed_reconciliation = reconciliation_status(rt, out)
    _last_run(rt, out)
    out.write(next_run_line(rt, datetime.now(UTC)))
    return 1 if blocked or failed_reconciliation else 0


def _last_run(rt: Runtime, out: TextIO) -> None:
    """`billing status`: the newest invoice run (projections/invoice_runs.py) and every
    organisation it did not invoice, with why."""
    with rt.pool.connection() as conn:
        run = invoice_run_records.latest(conn)
    if run is None:
        out.write("last invoice run: none recorded yet\n")
        return
    finished = run.finished_at.isoformat(timespec="minutes") if run.finished_at else "not finished"
    out.write(f"last invoice run {run.id}: {run.period}, {run.status}, started "
              f"{run.started_at.isoformat(timespec='minutes')} by {run.started_by}, {finished}; "
              f"{run.organisations_done}/{run.organisations_total} organisations: created "
              f"{run.created}, existing {run.existing}, skipped {run.skipped}, not due "
              f"{run.not_due}, blocked {run.blocked}, failed {run.failed}\n")
    for entry in run.organisations:
        out.write(f"  {entry.outcome}: {entry.name} ({entry.organisation_id}): {entry.reason}\n")
    if run.more:
        out.write(f"  ... and {run.more} more (GET /admin/v1/invoice-runs/{run.id})\n")


def next_run_line(rt: Runtime, now: datetime) -> str:
    """`billing status`'s last line: when the scheduler (in `billing serve`, another process) runs
    the invoice run next, from the record it keeps (adapters/schedule.py), and for which periods;
    or, if it stopped or its record is stale (a killed `serve` records nothing), that no
    scheduler is running it."""
    grace = timedelta(hours=rt.settings.grace_hours)
    every = f"every {INVOICE_RUN_EVERY_MIN} min while `billing serve` runs (the first at its start)"
    with rt.pool.connection() as conn:
        job = job_record(conn, INVOICE_RUN_JOB)
    if job is None:
        return (f"next invoice run: {every}, for "
                f"{', '.join(sorted(due_periods(now, grace, CATCH_UP_PERIODS)))}\n")
    last = ""
    if job.started_at is not None:
        last = f"; the last started {_minute(job.started_at)}" + (
            f", finished {_minute(job.finished_at)}"
            if job.finished_at is not None and job.finished_at >= job.started_at
            else ", still running" if job.next_run_at is not None else ", did not finish")
    if job.next_run_at is None:
        return (f"next invoice run: none scheduled: the scheduler stopped at "
                f"{_minute(job.recorded_at)}; is `billing serve` running? ({every}{last})\n")
    due = ", ".join(sorted(due_periods(max(now, job.next_run_at), grace, CATCH_UP_PERIODS)))
    if job.next_run_at >= now - timedelta(seconds=SCHEDULE_LATE_S):
        return f"next invoice run: {_minute(job.next_run_at)}, for {due} ({every}{last})\n"
    return (f"next invoice run: none scheduled: one was due {_minute(job.next_run_at)} and no "
            f"scheduler has run it since; is `billing serve` running? ({every}{last})\n")


def _minute(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="minutes")


class FailedDelivery(msgspec.Struct, frozen=True):
    """A delivery the process manager recorded as failed, as `billing payments failed` lists it."""

    id: UUID
    event_id: str
    event_type: str
    detail: str | None


def failed_deliveries(rt: Runtime) -> list[FailedDelivery]:
    """Every delivery recorded as failed, oldest first (the gateway_events read model)."""
    with rt.pool.connection() as conn:
        return [FailedDelivery(*row) for row in conn.execute(FAILED_DELIVERIES_SQL).fetchall()]


def _payments_command(rt: Runtime, args: argparse.Namespace, out: TextIO) -> int:
    """`billing payments failed | reapply [--event-id ID]`."""
    if args.action == "failed":
        for delivery in failed_deliveries(rt):
            out.write(msgspec.json.encode(delivery).decode() + "\n")
        return 0
    return reapply(rt, rt.payments(), out, event_id=args.event_id)


def reapply(rt: Runtime, service: PaymentsService, out: TextIO, *, event_id: str | None) -> int:
    """Apply afresh every failed delivery (or the one with `event_id`), printing each one's
    outcome. Exit code: 0, or 1 if any still fails, 2 if no delivery has that event id."""
    refs = ([d.id for d in failed_deliveries(rt)] if event_id is None
            else [gateway_event_ref(event_id)])
    still_failed = 0
    for ref in refs:
        try:
            still_failed += not _reapply(service, rt, ref, out)
        except NotFound:
            sys.stderr.write(f"billing: no gateway delivery with event id {event_id!r}\n")
            return 2
    if event_id is None:
        out.write(f"re-applied {len(refs) - still_failed} of {len(refs)} failed deliveries\n")
    return 1 if still_failed else 0


def _reapply(service: PaymentsService, rt: Runtime, ref: UUID, out: TextIO) -> bool:
    """Apply one delivery afresh if it failed and print its outcome; False if it still fails.
    Any error is the delivery's (it stays `failed`, with the error it first failed with)."""
    delivery = rt.ledger.get(ref, GatewayEvent)
    name = f"{delivery.event_id} {delivery.event_type or '-'}"
    if delivery.outcome != FAILED:
        out.write(f"{name}: {delivery.outcome or 'not applied yet'} (not failed: left as it is)\n")
        return True
    try:
        outcome = service.apply_delivery(ref, again=True)
    except Exception as e:  # a bug not fixed yet, or the ledger away: say so, go on to the next
        out.write(f"{name}: still failed: {type(e).__name__}: {e}\n")
        return False
    out.write(f"{name}: {outcome}\n")
    return outcome != FAILED


def _local_operator() -> Actor:
    """The local operator, as the audit trail names CLI commands."""
    return Actor(uuid5(CLI_NAMESPACE, getpass.getuser()), "owner", None, "cli", f"cli-{uuid4().hex}")


def _invoice_run(rt: Runtime, period: str) -> int:
    actor = _local_operator()
    with tqdm(unit="org", desc=f"invoice run {period}", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            result = rt.invoice_run().run(period, progress, actor=actor)
        except DomainError as e:
            sys.stderr.write(f"billing: {e}\n")
            return 2
    sys.stdout.write(f"{period}: created {result.created}, existing {result.existing}, skipped "
                     f"{result.skipped}, not due {result.not_due}, failed {result.failed}, "
                     f"blocked {len(result.blocked)}\n")
    for entry in result.entries:
        sys.stdout.write(f"  {entry.outcome}: {entry.name} ({entry.organisation_id}): "
                         f"{entry.reason}\n")
    if result.more:
        sys.stdout.write(f"  ... and {result.more} more not invoiced (see the log)\n")
    if result.run_id is not None:
        sys.stdout.write(f"run {result.run_id}: GET /admin/v1/invoice-runs/{result.run_id}\n")
    return 1 if result.blocked or result.failed else 0


def _tenant_command(rt: Runtime, args: argparse.Namespace) -> int:
    """Operator commands without HTTP; audited as the local operator."""
    clock = lambda: datetime.now(UTC)  # noqa: E731
    actor = _local_operator()
    out = sys.stdout
    try:
        if args.command == "admin":
            access = AccessService(rt.ledger, clock, uuid4, new_key_secret)
            org = UUID(args.organisation) if args.organisation else None
            _, token = access.issue_token(role=args.role, organisation_id=org, name=args.name,
                                          expires_at=None, actor=actor)
            out.write(token + "\n")
        elif args.command == "orgs":
            settings = OrganisationSettings(
                name=args.name, billing_email=args.billing_email,
                state_code=args.state_code or msgspec.UNSET, gstin=args.gstin or msgspec.UNSET)
            written = OrganisationService(rt.ledger, clock, uuid4).create(settings, actor=actor)
            out.write(f"{written.aggregate.id}\n")
        elif args.command == "projects":
            project = CatalogueService(rt.ledger, clock, uuid4).create_project(
                UUID(args.organisation), args.name, actor=actor)
            out.write(f"{project.aggregate.id}\n")
        else:
            keys = AccessService(rt.ledger, clock, uuid4, new_key_secret)
            if args.action == "create":
                _, key = keys.issue_key(UUID(args.project), args.name, None, actor=actor)
                out.write(key + "\n")
            else:
                keys.revoke_key(UUID(args.key_id), actor=actor)
                out.write("revoked\n")
    except (DomainError, ValueError) as e:
        sys.stderr.write(f"billing: {e}\n")
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `billing` command; its exit code."""
    args = _parser().parse_args(argv)
    # The API, the writer thread and the projector threads share one interpreter: a shorter
    # GIL switch interval lets a thread that has its answer (e.g. a commit) run sooner.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    settings = from_env()
    logs.configure(settings.log_level)
    if args.command == "serve":
        return _run_roles(settings, {"api", "scheduler"}, with_children=True)
    if args.command == "api":
        return _run_roles(settings, {"api"}, listen_fd=args.listen_fd)
    if args.command in ("relay", "project", "worker", "scheduler"):
        if args.niceness:
            os.nice(args.niceness)
        return _run_roles(settings, {"relay", "project", "seal"} if args.command == "worker"
                          else {args.command})
    if (invalid := _invalid_arguments(args)) is not None:  # before any server is started
        sys.stderr.write(f"billing: {invalid}\n")
        return 2
    if args.command == "seal":
        return _run_roles(settings, {"seal"})
    if (code := ledger_cli.offline(args)) is not None:  # `ledger verify --file`: no database
        return code
    return _operator(settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
