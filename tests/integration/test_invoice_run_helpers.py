"""Issue 19: an invoice run hands batches to helper processes (adapters/invoice_run_helpers.py)
and still drafts every organisation's invoice exactly once: with a helper at work, with a
helper SIGKILLed in the middle of a run (the run stops; the next one drafts the rest), and no
helper outlives its run. Small batches, so that a few dozen organisations make several."""

from __future__ import annotations

import logging
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID, uuid4

import pytest

import adapters.invoice_run as invoice_run
from domain.audit import Actor
from domain.errors import Unavailable
from domain.invoice import Invoice, invoice_id
from domain.period import period_of, shift_period
from infra.wiring import Runtime
from tests.integration.invoice_run_steps import entries_of, rebuild_read_models, subscribed

ORGS = 60
ORGS_PER_BATCH = 10
BLOCKED_EVERY = 7  # every 7th organisation is blocked: in batches here and in the helper's
HELPER_MODULE = "adapters.invoice_run_helpers"


def _helpers_alive() -> list[int]:
    """Helper processes started by this process that are still running (not zombies)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and HELPER_MODULE in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoice_run, "ORGS_PER_BATCH", ORGS_PER_BATCH)
    monkeypatch.setattr(invoice_run, "HELPERS_FROM_ORGS", 2 * ORGS_PER_BATCH)


@pytest.mark.usefixtures("small_batches")
def test_a_run_with_a_helper_process_drafts_every_invoice_once_each_audited_as_its_actor(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime
    period = shift_period(period_of(datetime.now(UTC), "Asia/Kolkata"), -2)
    ids = subscribed(rt, period, ORGS, "helped")
    runner = rt.invoice_run()
    admin = Actor(uuid4(), "admin", None, "127.0.0.1", "run-with-helpers")
    with caplog.at_level(logging.INFO, logger="billing.invoice_run"):
        result = runner.run(period, actor=admin)
    assert (result.created, result.existing, result.failed) == (ORGS, 0, 0)
    helped = [r.getMessage() for r in caplog.records if "helper processes" in r.getMessage()]
    assert helped and not helped[0].split(": ", 1)[1].startswith("0 batches"), helped
    assert len(rt.ledger.get_many([invoice_id(o, period) for o in ids], Invoice)) == ORGS
    assert entries_of(rt, "Invoice.Drafted") == ORGS
    # Each draft has its own audit entry naming the actor, the helper's as the run's own.
    assert entries_of(rt, "AuditEntry.Recorded") == ORGS
    rebuild_read_models(rt)
    with rt.pool.connection() as conn:
        audited = conn.execute("SELECT request_id, actor_id, count(*) FROM audit_events"
                               " GROUP BY 1, 2").fetchall()
    assert audited == [("run-with-helpers", admin.principal_id, ORGS)]
    assert _helpers_alive() == []
    # Run again: every one exists already, nothing is appended.
    head = rt.ledger.head()
    again = runner.run(period, actor=None)
    assert (again.created, again.existing) == (0, ORGS)
    assert rt.ledger.head() == head


@pytest.mark.usefixtures("small_batches")
def test_a_helper_killed_mid_run_stops_the_run_and_the_next_run_drafts_the_rest_once(
    runtime: Runtime
) -> None:
    rt = runtime
    period = shift_period(period_of(datetime.now(UTC), "Asia/Kolkata"), -2)
    ids = subscribed(rt, period, ORGS, "helped")
    killed: list[int] = []

    def kill_the_helper(done: int, _total: int) -> None:
        if not killed:
            for pid in _helpers_alive():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    with pytest.raises(Unavailable, match="helper"):
        rt.invoice_run().run(period, kill_the_helper, actor=None)
    assert killed
    assert entries_of(rt, "Invoice.Drafted") < ORGS  # stopped part-way
    assert _helpers_alive() == []
    rebuild_read_models(rt)
    result = rt.invoice_run().run(period, actor=None)
    assert result.created + result.existing == ORGS and result.failed == 0
    assert len(rt.ledger.get_many([invoice_id(o, period) for o in ids], Invoice)) == ORGS
    assert entries_of(rt, "Invoice.Drafted") == ORGS
    assert _helpers_alive() == []


@pytest.mark.usefixtures("small_batches")
def test_organisations_blocked_by_dead_letters_in_helper_batches_are_blocked_and_recorded(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19 review: the run's dead letters go to the helper with each batch (pickled); the
    organisations they block are blocked there as here, reported with their positions, and the
    rest drafted once."""
    rt = runtime
    period = shift_period(period_of(datetime.now(UTC), "Asia/Kolkata"), -2)
    ids = subscribed(rt, period, ORGS, "helped")
    stuck = set(ids[::BLOCKED_EVERY])
    head = rt.ledger.head()
    positions: dict[UUID, int] = {}
    for entry in rt.ledger.read_after(0, head, stop=head):
        owner = getattr(rt.ledger.decode(entry), "organisation_id", None)
        if owner in stuck and "Subscription" in entry.topic:
            positions[owner] = int(entry.id)
    assert set(positions) == stuck
    with rt.pool.connection() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO projection_dead_letters (name, position, topic, error, attempts)"
            " VALUES ('plans', %s, 'test', 'test', 6)", [(p,) for p in positions.values()])
    with caplog.at_level(logging.INFO, logger="billing.invoice_run"):
        result = rt.invoice_run().run(period, actor=None)
    helped = [r.getMessage() for r in caplog.records if "helper processes" in r.getMessage()]
    assert helped and not helped[0].split(": ", 1)[1].startswith("0 batches"), helped
    assert {b.organisation_id: b.missing_positions for b in result.blocked} == {
        o: [p] for o, p in positions.items()}
    assert (result.created, result.failed) == (ORGS - len(stuck), 0)
    assert entries_of(rt, "Invoice.Drafted") == ORGS - len(stuck)
    assert _helpers_alive() == []
