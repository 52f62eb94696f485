"""Helper processes of the invoice run: a batch of organisations read, priced and appended in
another process, so that billing day uses more than one core (what bounds a run is the Python
work per invoice; Postgres mostly waits).

A helper is a program of its own (`python -m adapters.invoice_run_helpers FD`), never a fork
(the process that runs an invoice run has threads and connection pools a fork would copy
mid-use), talking over a socket pair. It builds its own run from a recipe (its own
ledger and connections: infra/wiring.py helper_invoice_run), then takes one batch at a time
over a pipe and answers what it did with each organisation. The run that owns it holds the
run's lock; a helper only appends batches it is handed, each whole or not at all, with derived
invoice ids, so a helper can never draft an invoice twice.

When the owner dies (SIGKILL included), its end of the pipe closes: the helper reads EOF and
exits, appending nothing more (the run's lock went with its owner: a void, a redraft or a moved
subscription start may be under way; an append already in flight commits or not, as the owner's
own would). A run started again drafts what it had in hand.
When a helper dies, the owner reads EOF, and the run stops as it would with Postgres away
(Unavailable): a run started again does the rest.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from adapters.gc_pace import fewer_collections
from domain.audit import Actor
from domain.errors import Unavailable
from domain.services.invoice_runs import Done

if TYPE_CHECKING:
    from adapters.invoice_run import InvoiceRun, Priced, _Batch

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
HELPERS_MAX = 8
BATCHES_IN_HAND_MAX = 2  # one priced while the one before is appended  # helper processes one run may use
STOP_TIMEOUT_S = 30.0  # a helper asked to stop finishes its batch first
RESULT_POLL_S = 1.0  # how often a wait for a batch checks that the helper is still alive
BATCH_TIMEOUT_S = 3600.0  # one batch of at most ORGS_PER_BATCH organisations, at most
ERROR_TEXT_MAX_CHARS = 500

# Builds the helper's own run (and closes its connections after).
Recipe = Callable[[], AbstractContextManager["InvoiceRun"]]


class Helper:
    """One helper process and the batches it has in hand (at most BATCHES_IN_HAND_MAX: it
    prices one while it appends the one before, as the run itself does)."""

    def __init__(self, recipe: Recipe) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            # A program of its own (not multiprocessing's spawn, which would import the
            # caller's __main__ again): the project's packages from where this one is.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())
        self.in_hand = 0  # batches handed and not answered yet
        self.batches = 0  # answered so far
        self._send(recipe)

    def submit(self, batch: _Batch, chunk: Sequence[UUID], actor: Actor | None) -> None:
        """Hand the helper one more batch of organisations; it answers them in order."""
        assert self.in_hand < BATCHES_IN_HAND_MAX
        self._send((batch, list(chunk), actor))
        self.in_hand += 1

    def _send(self, message: object) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise Unavailable(f"an invoice run helper stopped (exit {self._process.poll()})") from None

    def done(self) -> bool:
        """True when the oldest batch in hand is answered (take it with `result`)."""
        return self.in_hand > 0 and self._conn.poll()

    def result(self, timeout_s: float = BATCH_TIMEOUT_S) -> list[Done]:
        """What the helper did with each organisation of its oldest batch in hand; waits for
        it. Unavailable when the helper failed, died, or took longer than `timeout_s`."""
        assert self.in_hand > 0
        waited_s = 0.0
        while not self._conn.poll(RESULT_POLL_S):
            waited_s += RESULT_POLL_S
            if self._process.poll() is not None and not self._conn.poll():
                raise Unavailable(f"an invoice run helper stopped (exit {self._process.returncode})")
            if waited_s >= timeout_s:
                raise Unavailable("an invoice run helper did not answer in time")
        try:
            kind, answer = self._conn.recv()
        except (EOFError, OSError):  # closed, or reset by a helper that was killed
            raise Unavailable(f"an invoice run helper stopped (exit {self._process.poll()})"
                              ) from None
        self.in_hand -= 1
        self.batches += 1
        if kind == "failed":
            raise Unavailable(f"an invoice run helper failed: {answer}")
        outcomes: list[Done] = answer
        return outcomes

    def stop(self) -> None:
        """Ask the helper to exit (after its batch, if any) and wait; kill it if it does not."""
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(None)
        # Our end closed too: a helper sending an answer nobody will read now gets EPIPE and
        # exits, rather than block until it is killed (it reads the None sent first).
        self._conn.close()
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT_S)


def _serve(conn: Connection) -> None:
    """The helper process: build its run from the recipe it is sent first, then answer
    batches until told to stop or the owner's end closes."""
    try:
        recipe: Recipe = conn.recv()
    except (EOFError, OSError):
        return
    owner = os.getppid()  # the run that started this helper, and holds the run's lock

    # One batch's drafts are appended and answered (a thread of its own, waiting on Postgres)
    # while the next batch is read and priced; answers go in the order batches came.
    with recipe() as run, fewer_collections(), ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="helper-append") as appender:
        while True:
            try:
                work: Any = conn.recv()
            except (EOFError, OSError):
                return  # the owner is gone (the appends under way finish first)
            if work is None:
                return
            batch, chunk, actor = work
            try:
                priced = run.price_batch(batch, chunk)
            except Exception as e:  # the owner stops the run with it (a later run resumes)
                appender.submit(_answer, conn, ("failed", _error_text(e)))
                continue
            appender.submit(_append_and_answer, run, conn, priced, actor, owner)


def _append_and_answer(run: InvoiceRun, conn: Connection, priced: Priced,
                       actor: Actor | None, owner: int) -> None:
    if os.getppid() != owner:  # the owner died (this process was given another parent)
        return  # and its lock with it: append nothing more (a later run drafts these)
    outcomes, drafts = priced
    try:
        answer: tuple[str, Any] = ("done", outcomes + run.append_batch(drafts, actor))
    except Exception as e:
        answer = ("failed", _error_text(e))
    _answer(conn, answer)


def _answer(conn: Connection, answer: tuple[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the owner is gone; what was appended stays
        conn.send(answer)


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:ERROR_TEXT_MAX_CHARS]


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
