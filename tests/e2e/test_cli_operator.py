"""The operator commands as a new admin meets them (issue 21, "The CLI"): an empty dead-letter
list says so, a bad period is refused before any work, a project is created without HTTP and
audited as the local operator, and `billing status` shows lag, dead letters, the invoice runs
and the schedule. Run in process over one real ledger (parsing and dispatch included)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.cli import _operate, _parser
from infra.wiring import Runtime
from tests.conftest import make_settings
from tests.e2e.conftest import close_and_drop


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory,
       server_urls: tuple[str, str]) -> Iterator[Runtime]:
    settings = make_settings(Path(tmp_path_factory.mktemp("cli")))
    runtime = Runtime.open(settings, *server_urls)
    try:
        yield runtime
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, runtime)


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
