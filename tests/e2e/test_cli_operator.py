"""The operator commands as a new admin meets them (issue 21, "The CLI"): an empty dead-letter
list says so, a bad period is refused before any work, a project is created without HTTP and
audited as the local operator, and `billing status` shows lag, dead letters, the invoice runs
and the schedule. Run in process over one real ledger (parsing and dispatch included)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest

from adapters import bookkeeping
from adapters.maintenance import rebuild
from domain.audit import AuditEntry
from domain.project import Project
from domain.records import Blocked, RunEntry, RunResult
from infra.cli import NO_DATA_EXIT, _operate, _parser, main
from infra.embedded import free_port
from infra.scheduler import INVOICE_RUN_EVERY_MIN
from infra.wiring import READ_MODELS, Runtime
from projections import invoice_runs as invoice_run_records
from projections import invoices
from tests.conftest import make_settings
from tests.e2e.conftest import close_and_drop
from tests.integration.test_payment_manager import finalized


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory,
       server_urls: tuple[str, str]) -> Iterator[Runtime]:
    settings = make_settings(Path(tmp_path_factory.mktemp("cli")))
    runtime = Runtime.open(settings, *server_urls)
    try:
        yield runtime
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, runtime)


@pytest.fixture
def cli_process_state() -> Iterator[None]:
    """main() sets the process's logging and GIL switch interval; put them back after."""
    root = logging.getLogger()
    handlers, level, interval = root.handlers[:], root.level, sys.getswitchinterval()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("argv", [["status"], ["dlq", "list"], ["orgs", "create", "--name", "A",
                                                                   "--billing-email", "a@b.in"]])
def test_without_service_data_an_operator_command_says_so_and_creates_nothing(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], cli_process_state: None,
) -> None:
    for name in ("DATABASE_URL", "NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    empty, absent = tmp_path / "empty", tmp_path / "absent"
    empty.mkdir()
    for data in (empty, absent):
        monkeypatch.setenv("BILLING_DATA_DIR", str(data))
        assert main(argv) == NO_DATA_EXIT
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"billing: no billing data in {data} ")
        assert "DATABASE_URL is not set" in captured.err
    assert list(empty.iterdir()) == [] and not absent.exists()


def billing(rt: Runtime, *argv: str) -> tuple[int, str, str]:
    """`billing argv...` against this runtime: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _operate(rt, _parser().parse_args(list(argv)))
    return code, out.getvalue(), err.getvalue()


def test_an_empty_dead_letter_list_says_there_are_none(rt: Runtime) -> None:
    assert billing(rt, "dlq", "list") == (0, "no dead letters\n", "")
    assert billing(rt, "dlq", "list", "--projection", "invoices") == (0, "no dead letters\n", "")


def test_an_invalid_period_is_refused_with_exit_2_before_any_progress_bar(rt: Runtime) -> None:
    head = rt.ledger.head()
    code, out, err = billing(rt, "invoices", "run", "--period", "2026-13")
    assert (code, out) == (2, "")
    assert err == "billing: period: must be a month written YYYY-MM, e.g. 2026-10\n"
    assert rt.ledger.head() == head


def test_a_project_is_created_without_http_and_audited_as_the_local_operator(
    rt: Runtime,
) -> None:
    code, out, _ = billing(rt, "orgs", "create", "--name", "Acme", "--billing-email", "ap@acme.in")
    assert code == 0
    org = UUID(out.strip())
    head = rt.ledger.head()
    code, out, err = billing(rt, "projects", "create", "--organisation", str(org), "--name", "web")
    assert (code, err) == (0, "")
    project = rt.ledger.get(UUID(out.strip()), Project)
    assert (project.organisation_id, project.name) == (org, "web")
    entries = [rt.ledger.decode(n) for n in rt.ledger.read_after(head, 100)]
    (audit,) = [e for e in entries if isinstance(e, AuditEntry.Recorded)]
    assert audit.source_ip == "cli" and audit.role == "owner"
    assert str(project.id) in str(audit.targets)


def test_a_project_of_an_unknown_organisation_is_refused_with_exit_2(rt: Runtime) -> None:
    code, out, err = billing(rt, "projects", "create", "--organisation",
                             "00000000-0000-4000-8000-000000000000", "--name", "web")
    assert (code, out) == (2, "") and "not found" in err
    with pytest.raises(SystemExit) as refused:  # a usage error, found as the arguments are parsed
        billing(rt, "projects", "create", "--organisation", "nope", "--name", "web")
    assert refused.value.code == 2


def test_status_shows_lag_dead_letters_invoice_runs_blocked_organisations_and_the_schedule(
    rt: Runtime,
) -> None:
    code, out, _ = billing(rt, "status")
    assert code == 0
    assert "invoice runs: none has drafted an invoice yet\n" in out
    assert out.splitlines()[-2] == "last invoice run: none recorded yet"

    _, invoice = finalized(rt)
    rebuild(rt.pool, rt.ledger, invoices.READ_MODEL)
    with rt.pool.connection() as conn:
        bookkeeping.record_blocked(conn, invoice.period, [
            Blocked(invoice.organisation_id, "Blocked Ltd", [7], {"usage_totals": [7]})])
    code, out, _ = billing(rt, "status")
    lines = out.splitlines()
    assert code == 1  # an organisation left uninvoiced
    for model in READ_MODELS:
        assert any(re.fullmatch(rf"{model.name}: position \d+, lag \d+, dead letters 0", line)
                   for line in lines), model.name
    assert any(re.fullmatch(r"relay: position \d+, head \d+, lag \d+", line) for line in lines)
    assert any(re.fullmatch(rf"invoice run {invoice.period}: 1 invoices, latest drafted "
                            r"\d{4}-\d\d-\d\dT\d\d:\d\d\+00:00, blocked 1", line)
               for line in lines), out
    assert any(line.startswith(f"not invoiced for {invoice.period}: Blocked Ltd "
                               f"({invoice.organisation_id}): dead-lettered entries "
                               "{'usage_totals': [7]}") for line in lines), out
    assert lines[-2] == "last invoice run: none recorded yet"
    assert lines[-1].startswith(f"next invoice run: every {INVOICE_RUN_EVERY_MIN} min while "
                                "`billing serve` runs (the first at its start), for ")

    # A run is recorded (projections/invoice_runs.py, as the run writes it; the run's own tests
    # show it does): status names the newest, its counts, and each organisation it did not
    # invoice with why.
    run_id, org_id, at = uuid4(), uuid4(), datetime.now(UTC) + timedelta(minutes=1)
    entry = RunEntry(org_id, "Later Ltd", "skipped", "no plan covers the period")
    with rt.pool.connection() as conn:
        invoice_run_records.started(conn, run_id, invoice.period, "scheduler", at, 2)
        invoice_run_records.finished(conn, run_id, 2, RunResult(
            invoice.period, existing=1, skipped=1, entries=[entry]), at)
    code, out, _ = billing(rt, "status")
    lines = out.splitlines()
    assert (f"last invoice run {run_id}: {invoice.period}, done, started "
            f"{at.isoformat(timespec='minutes')} by scheduler, {at.isoformat(timespec='minutes')}; "
            "2/2 organisations: created 0, existing 1, skipped 1, not due 0, blocked 0, failed 0"
            ) in lines, out
    assert f"  skipped: Later Ltd ({org_id}): no plan covers the period" in lines, out
    assert lines[-1].startswith(f"next invoice run: every {INVOICE_RUN_EVERY_MIN} min while "
                                "`billing serve` runs (the first at its start), for ")


@pytest.mark.parametrize("argv", [
    ["invoices", "run", "--period", "2026-13"],
    ["projects", "create", "--organisation", "nope", "--name", "web"],
    ["keys", "create", "--project", "nope"],
    ["keys", "revoke", "nope"],
    ["admin", "create-token", "--role", "org_admin", "--organisation", "nope"],
])
def test_bad_arguments_are_refused_with_exit_2_before_any_data_is_looked_for(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], cli_process_state: None,
) -> None:
    """A bad period or id is the user's to fix, said first: not 'no data' (exit 3), not a UUID
    parser's message after a server was started."""
    for name in ("DATABASE_URL", "NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path / "absent"))
    code: int | str | None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage error
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "no billing data" not in captured.err
    if argv[0] == "invoices":
        assert captured.err == "billing: period: must be a month written YYYY-MM, e.g. 2026-10\n"
    else:
        assert re.search(r"error: argument (--organisation|--project|key_id): 'nope' is not an "
                         r"id \(ids are UUIDs", captured.err), captured.err
    assert not (tmp_path / "absent").exists()


def test_a_database_without_the_ledger_is_refused_and_left_as_it_was(
    rt: Runtime, server_urls: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], cli_process_state: None,
) -> None:
    """DATABASE_URL (or BILLING_PG_SCHEMA) naming a database the service never ran on: the
    command says so, exit 3, and creates no ledger there; the service's own is worked on."""
    schema = f"t_noledger_{uuid4().hex[:8]}"
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("DATABASE_URL", server_urls[0])
    monkeypatch.setenv("BILLING_PG_SCHEMA", schema)
    for argv in (["status"], ["orgs", "create", "--name", "A", "--billing-email", "a@b.in"]):
        assert main(argv) == NO_DATA_EXIT
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"billing: no billing ledger in schema '{schema}' of "
                                       "127.0.0.1:"), captured.err
    with psycopg.connect(server_urls[0]) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                            (schema,)).fetchone() == (0,)

    monkeypatch.setenv("BILLING_PG_SCHEMA", rt.settings.pg_schema)
    assert main(["dlq", "list"]) == 0
    assert capsys.readouterr().out == "no dead letters\n"

    unreachable = f"postgresql://billing:s3cret@127.0.0.1:{free_port()}/billing"
    monkeypatch.setenv("DATABASE_URL", unreachable)
    assert main(["status"]) == NO_DATA_EXIT
    err = capsys.readouterr().err
    assert err.startswith("billing: cannot reach the database at 127.0.0.1:") and "s3cret" not in err
