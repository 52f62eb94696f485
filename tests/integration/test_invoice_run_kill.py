"""Issue 19: billing day for 10,000 organisations, SIGKILLed at random points and started again,
yields every invoice exactly once, with gapless numbers. A child process
(invoice_run_child.py) runs the invoice run and then finalize-and-number, with the production
batch sizes (adapters/invoice_run.py: 1,000 organisations per batch, 500 drafts per append, 500
numbers per append), printing its progress after each batch. The test kills it at random
points, DRAFT_KILLS of them in the drafting and FINALIZE_KILLS in the numbering: once the
progress passes the point, after a random part of the last batch's time, so that the kill lands
anywhere in the next batch (pricing, an append in flight, a numbering transaction). Each
time it starts a child again; the last one runs to the end. Then it checks the ledger itself,
and that no process it started is left running.

The setup is fast: the organisations and their subscriptions are appended
SAVE_BATCH_ORGS per ledger transaction, each organisation's usage goes through the usage
writer (a call each, in a few group commits), and the read models are rebuilt from the ledger
(adapters/maintenance.rebuild) instead of pushing the setup through the relay and the
projectors. The relay and the projectors of the read models the run waits for run only for
the billing day itself: a child started after a kill waits (its run's gate) until those read
models hold what the killed ones appended."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

from adapters.invoice_run import DEAD_LETTER_MODELS, ORGS_PER_BATCH
from adapters.ledger import GET_MANY_MAX_AGGREGATES
from adapters.maintenance import rebuild
from adapters.period_numbering import FINALIZE_BATCH_INVOICES
from adapters.projector import Projector
from adapters.relay import RELAY_NAME, Relay
from adapters.usage_writer import UsageWriter, encode_usage
from domain.invoice import FINALIZED, Invoice, invoice_id
from domain.meter import Meter
from domain.numbering import InvoiceSequence, format_number, sequence_id
from domain.organisation import Organisation, OrganisationSettings
from domain.period import period_bounds, period_of, shift_period
from domain.plan import ChargeSpec, Plan
from domain.records import KeyRecord
from domain.subscription import Subscription
from domain.usage import UsageFact
from infra.wiring import READ_MODELS, Runtime
from projections import invoice_runs
from tests.conftest import close_nats, wait_sync
from tests.integration import orphans
from tests.integration.invoice_run_child import BUSY_EXIT

ORGS = 10_000
DRAFT_KILLS = 2
FINALIZE_KILLS = 2
SAVE_BATCH_ORGS = 1000  # organisations (each with its subscription) per ledger transaction
USAGE_ORGS_PER_APPEND = 2500  # organisations whose usage goes in one group commit
USAGE_EVENTS_PER_ORG = 1
SUBTOTAL_PAISE = 500_00 + USAGE_EVENTS_PER_ORG * 50  # the base fee, and 0.50 per call
STARTS_MAX = 40  # children started in all (kills, lock still held by a killed one, the last)
STOP_S = 30.0  # for the relay and projectors to stop
ORPHANS_GONE_S = 10.0  # for a killed child's own children to notice and exit
TIMEZONE = "Asia/Kolkata"
ROOT = Path(__file__).resolve().parents[2]


def _setup(rt: Runtime, period: str) -> list[UUID]:
    """ORGS organisations on a plan with a base fee and a price per call, each with a few calls
    in the period, every read model rebuilt up to the ledger's head, and the relay's position
    there too."""
    now = datetime.now(UTC)
    meter = Meter.define("calls", "API calls", "count", None, [], False, now)
    plan = Plan.publish("kill", "Kill", "INR", Decimal(500), Decimal(0),
                        [ChargeSpec("calls", "per_unit", unit_price=Decimal("0.5"))], {"calls"}, now)
    rt.ledger.save(meter, plan, actor=None)
    begins = period_bounds(period, TIMEZONE)[0]
    ids = []
    for first in range(0, ORGS, SAVE_BATCH_ORGS):
        groups = []
        for i in range(first, min(ORGS, first + SAVE_BATCH_ORGS)):
            org = Organisation.create(uuid4(), OrganisationSettings(
                name=f"org {i}", billing_email=f"o{i}@example.in", state_code="29"), now)
            groups.append((org, Subscription.start(org.id, "kill", begins - timedelta(days=40),
                                                   now)))
            ids.append(org.id)
        rt.ledger.save_batch(groups, actor=None)
    asyncio.run(_usage(rt, ids, begins + timedelta(days=3), now))
    for model in READ_MODELS:
        rebuild(rt.pool, rt.ledger, model)
    # The relay starts after the setup, which the read models hold already: as though it had
    # published the setup (relaying it would have every projector skip it, entry by entry).
    with rt.pool.connection() as conn:
        conn.execute("INSERT INTO relay_positions (name, position) VALUES (%s, %s)",
                     (RELAY_NAME, rt.ledger.head()))
    return ids


async def _usage(rt: Runtime, ids: list[UUID], inside: datetime, now: datetime) -> None:
    writer = UsageWriter(rt.database_url, rt.settings.pg_schema)
    try:
        for first in range(0, len(ids), USAGE_ORGS_PER_APPEND):
            rows = []
            for org_id in ids[first:first + USAGE_ORGS_PER_APPEND]:
                key = KeyRecord(uuid4(), "p", "h", uuid4(), org_id, TIMEZONE, None, False)
                rows += [encode_usage(key, UsageFact(f"c{n}", "calls", Decimal(1), inside, {}),
                                      now) for n in range(USAGE_EVENTS_PER_ORG)]
            await writer.append(rows)
    finally:
        await writer.stop()


@contextlib.contextmanager
def _relay_and_projectors(rt: Runtime) -> Iterator[None]:
    """The relay and the projectors of the read models a run waits for (DEAD_LETTER_MODELS),
    on an event loop in a thread: background_roles' "relay" and "project" less the other read
    models and workers, whose CPU the children's runs need on a 2-core machine."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        js = await rt.connect_nats("billing-invoice-run-kill")
        try:
            await asyncio.gather(
                Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, js, rt.streams).run(stop),
                *(Projector(model, rt.ledger, rt.projection_pool(), js, rt.streams).run(stop)
                  for model in READ_MODELS if model.name in DEAD_LETTER_MODELS))
        finally:
            await close_nats(rt)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_S)
        loop.close()


@contextlib.contextmanager
def _child(rt: Runtime, period: str) -> Iterator[subprocess.Popen[str]]:
    """A child running billing day; killed if the test fails meanwhile, waited for always."""
    child = subprocess.Popen([sys.executable, "-m", "tests.integration.invoice_run_child",
                              rt.database_url, rt.settings.pg_schema, period],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        yield child
    except BaseException:
        child.kill()
        raise
    finally:
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _invoices(rt: Runtime, idents: list[UUID]) -> dict[UUID, Invoice]:
    """The invoices of `idents` that exist, GET_MANY_MAX_AGGREGATES per read."""
    out: dict[UUID, Invoice] = {}
    for first in range(0, len(idents), GET_MANY_MAX_AGGREGATES):
        out |= rt.ledger.get_many(idents[first:first + GET_MANY_MAX_AGGREGATES], Invoice)
    return out


def _numbered(rt: Runtime, now: datetime) -> int:
    """How many invoices the ledger has numbered (the financial year's sequence)."""
    found = rt.ledger.get_many([sequence_id(y) for y in range(now.year - 1, now.year + 1)],
                               InvoiceSequence)
    return sum(s.last for s in found.values())


def _point(line: str, numbered: int) -> int | None:
    """Where a progress line is on billing day: drafted n -> n (the run counts the drafts that
    exist already), finalized n -> ORGS + the numbered before this child + n."""
    kind, _, count = line.strip().partition(" ")
    if kind == "drafted":
        return int(count)
    if kind == "finalized":
        return ORGS + numbered + int(count)
    return None


def _targets(rng: random.Random) -> list[int]:
    """The kill points, in order: DRAFT_KILLS in the drafting, FINALIZE_KILLS in the numbering,
    each with at least two batches after it (its kill lands within the batch after the point:
    the child cannot be done by then)."""
    drafting = rng.sample(range(1, ORGS - 2 * ORGS_PER_BATCH + 1), DRAFT_KILLS)
    numbering = rng.sample(range(1, ORGS - 3 * FINALIZE_BATCH_INVOICES + 1), FINALIZE_KILLS)
    return sorted(drafting) + sorted(ORGS + n for n in numbering)


def _kill_past(child: subprocess.Popen[str], target: int, numbered: int, rng: random.Random,
               killed: set[orphans.Proc]) -> None:
    """SIGKILL the child at a random moment after its progress passes `target`: a random part
    of the time its last batch took, so within the batch after. The killed child's own
    processes (none today) go into `killed`, to be checked for at the end."""
    assert child.stdout is not None
    last = time.monotonic()
    for line in child.stdout:
        now = time.monotonic()
        took, last = now - last, now
        point = _point(line, numbered)
        if point is not None and point >= target:
            # Not a synchronisation: the kill's moment is what is random.
            time.sleep(rng.uniform(0, took))
            killed |= orphans.descendants(child.pid)
            child.kill()  # SIGKILL: no cleanup of any kind
            return


def test_billing_day_killed_at_random_points_makes_every_invoice_once_with_gapless_numbers(
    runtime: Runtime
) -> None:
    rt = runtime
    now = datetime.now(UTC)
    period = shift_period(period_of(now, TIMEZONE), -2)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    ids = _setup(rt, period)
    killed: set[orphans.Proc] = set()
    starts, kills = 0, 0
    with _relay_and_projectors(rt):
        for target in _targets(rng):
            code = BUSY_EXIT
            while code == BUSY_EXIT:  # the lock of a killed one still held: again
                assert starts < STARTS_MAX, f"seed {seed}"
                starts += 1
                numbered = _numbered(rt, now)
                with _child(rt, period) as child:
                    _kill_past(child, target, numbered, rng, killed)
                    code = child.wait()
            assert code == -signal.SIGKILL, f"child exited {code} before point {target} (seed {seed})"
            kills += 1
        while True:  # and once more, to the end
            assert starts < STARTS_MAX, f"seed {seed}"
            starts += 1
            with _child(rt, period) as child:
                out, _ = child.communicate()
            if child.returncode == 0:
                assert out.strip().endswith("done"), f"seed {seed}"
                break
            assert child.returncode == BUSY_EXIT, f"child exited {child.returncode} (seed {seed})"
    assert kills == DRAFT_KILLS + FINALIZE_KILLS, f"seed {seed}"
    # No process the test started is left: none names its schema, none of a killed child's own.
    wait_sync(lambda: not orphans.naming(rt.settings.pg_schema) and not orphans.alive(killed),
              f"no process left running (seed {seed}): {orphans.naming(rt.settings.pg_schema)}, "
              f"{orphans.alive(killed)}", ORPHANS_GONE_S)
    # Exactly one invoice per organisation: each has its revision 0, none has a revision 1,
    # and the ledger holds as many drafts as organisations.
    invoices = _invoices(rt, [invoice_id(o, period) for o in ids])
    assert len(invoices) == ORGS, f"seed {seed}"
    assert not _invoices(rt, [invoice_id(o, period, 1) for o in ids]), f"seed {seed}"
    with rt.pool.connection() as conn:
        drafted = conn.execute(f"SELECT count(*) FROM {rt.ledger.table}"
                               " WHERE topic LIKE '%%Invoice.Drafted'").fetchone()
        statuses = conn.execute("SELECT status, count(*) FROM invoice_runs GROUP BY status"
                                ).fetchall()
    assert drafted is not None and drafted[0] == ORGS, f"seed {seed}"
    # Every one numbered, and the numbers gapless: 1 .. ORGS of the financial year, once each.
    assert {i.status for i in invoices.values()} == {FINALIZED}, f"seed {seed}"
    # Each priced from its usage too: the base fee and its calls.
    assert {i.subtotal for i in invoices.values()} == {SUBTOTAL_PAISE}, f"seed {seed}"
    years = {i.number.split("/")[1] for i in invoices.values() if i.number}
    assert len(years) == 1, f"seed {seed}"
    sequence = next(iter(rt.ledger.get_many(
        [sequence_id(y) for y in range(now.year - 1, now.year + 1)], InvoiceSequence).values()))
    assert sequence.last == ORGS, f"seed {seed}"
    assert sorted(i.number or "" for i in invoices.values()) == [
        format_number(sequence.financial_year, n) for n in range(1, ORGS + 1)], f"seed {seed}"
    # The runs' history: the killed ones are interrupted (none left "running"), the last done.
    counted: dict[str, int] = {str(status): int(n) for status, n in statuses}
    assert invoice_runs.RUNNING not in counted and counted.get(invoice_runs.DONE, 0) >= 1, (
        f"{counted} (seed {seed})")
