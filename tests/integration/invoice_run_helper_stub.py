"""A stand-in for the run a helper process builds from its recipe (adapters/invoice_run_helpers.py),
for tests of the helper's own protocol with its owner: when it stops, and what it still appends
once its owner is gone. The run's work is replaced, not Postgres: what is under test is the pipe
between two processes and when a helper may append.

- `answering(reason_chars)`: every batch is priced and "appended" at once, and answered with one
  Done per organisation, each with a reason of `reason_chars` characters (a not-due reason is
  about 130): the size of a batch's answer is the size of the one the owner leaves unread.
- `held(folder)`: a batch's pricing tells the test it has the batch (it writes a line to the
  FIFO `folder/pricing`), then waits for the test's word (a line on the FIFO `folder/go`); an
  append leaves the file `folder/appended`.
- `python -m tests.integration.invoice_run_helper_stub FOLDER`: an owner that starts a helper
  over `held(FOLDER)`, hands it one batch, prints the helper's pid and waits on stdin (for the
  test to SIGKILL it). The helper inherits its stdout, so the test reads that pipe's EOF when
  the helper has exited too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

from adapters.invoice_run import _Batch
from adapters.invoice_run_helpers import Helper, Recipe
from domain.services.invoice_runs import DeadLettered, Done


class _Answering:
    def __init__(self, reason_chars: int) -> None:
        self._reason_chars = reason_chars

    def price_batch(self, batch: Any, chunk: Sequence[UUID]) -> tuple[list[Done], list[Any]]:
        # A string of its own per organisation, as not_due_reason makes one each (pickle
        # writes each out: it shares only the same object).
        return [Done(o, "not_due", name=f"org {o}", reason=str(o).ljust(self._reason_chars, "r"))
                for o in chunk], []

    def append_batch(self, drafts: list[Any], actor: Any) -> list[Done]:
        return []


class _Held:
    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def price_batch(self, batch: Any, chunk: Sequence[UUID]) -> tuple[list[Done], list[Any]]:
        with (self._folder / "pricing").open("w") as told:
            told.write("pricing\n")
        with (self._folder / "go").open() as word:
            word.readline()
        return [], [("draft", "name")]

    def append_batch(self, drafts: list[Any], actor: Any) -> list[Done]:
        (self._folder / "appended").write_text("appended\n")
        return [Done(uuid4(), "created")]


@contextlib.contextmanager
def _answering(reason_chars: int) -> Iterator[_Answering]:
    yield _Answering(reason_chars)


@contextlib.contextmanager
def _held(folder: str) -> Iterator[_Held]:
    yield _Held(Path(folder))


def answering(reason_chars: int) -> Recipe:
    return cast(Recipe, partial(_answering, reason_chars))


def held(folder: Path) -> Recipe:
    return cast(Recipe, partial(_held, str(folder)))


def a_batch() -> _Batch:
    return _Batch(period="2026-01", now=datetime.now(UTC), dead=DeadLettered(), actor=None,
                  usage_position=0, meter_names={})


def _owner(folder: str) -> None:
    helper = Helper(held(Path(folder)))
    helper.submit(a_batch(), [uuid4()], None)
    print(helper._process.pid, flush=True)
    sys.stdin.read()  # until the test SIGKILLs this process


if __name__ == "__main__":
    # By its module's name, not __main__'s: the helper unpickles the recipe by that name.
    from tests.integration.invoice_run_helper_stub import _owner as owner

    owner(sys.argv[1])
