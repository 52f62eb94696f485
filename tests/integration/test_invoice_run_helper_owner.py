"""Issue 19 review: a helper process (adapters/invoice_run_helpers.py) and the run that owns it.

- An owner that stops its helper with answers unread (it raised mid-run, or Ctrl-C) has it exit
  by itself at once: the helper must not sit blocked sending an answer nobody reads until
  STOP_TIMEOUT_S has passed and it is killed, while the run still holds its lock.
- A helper whose owner is SIGKILLed appends nothing more: the owner's lock (the run's) went with
  it, so a void, a redraft or a moved subscription start may already be under way, each of which
  that lock keeps away from drafting.

The run's work is a stand-in (tests/integration/invoice_run_helper_stub.py): what is under test
is the pipe and the helper's own rules, not Postgres."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest

import adapters.invoice_run_helpers as helpers
from adapters.invoice_run import ORGS_PER_BATCH
from adapters.invoice_run_helpers import BATCHES_IN_HAND_MAX, Helper
from tests.integration.invoice_run_helper_stub import a_batch, answering

ROOT = Path(__file__).resolve().parents[2]
# not_due_reason("2026-01", "America/Los_Angeles", 24 h): a batch of 1000 such answers
# pickles to 214 KB, more than a socket's default send buffer (net.core.wmem_default, 208 KiB).
NOT_DUE_REASON_CHARS = 140
STOP_TIMEOUT_TEST_S = 10.0  # ample for a helper to price two stand-in batches and exit
STEP_DEADLINE_S = 30.0  # for each step of the owner-killed test (the helper starting, ...)


def test_a_helper_stopped_with_its_answers_unread_exits_by_itself(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "STOP_TIMEOUT_S", STOP_TIMEOUT_TEST_S)
    helper = Helper(answering(NOT_DUE_REASON_CHARS))
    try:
        # One round trip first: the helper is up and has built its run.
        helper.submit(a_batch(), [uuid4()], None)
        assert len(helper.result()) == 1
        # Two batches of not-due organisations in hand, then the owner stops it without
        # reading their answers (what _run's finally does after an error).
        for _ in range(BATCHES_IN_HAND_MAX):
            helper.submit(a_batch(), [uuid4() for _ in range(ORGS_PER_BATCH)], None)
    finally:
        helper.stop()
    assert helper._process.returncode == 0, "the helper was killed: it was stuck sending"


def _read_within(fd: int, deadline_s: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], deadline_s)
    assert ready, f"nothing to read within {deadline_s}s"
    return os.read(fd, 4096)


def test_a_helper_whose_owner_is_killed_appends_no_batch_it_still_holds(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pricing")
    os.mkfifo(tmp_path / "go")
    # Opened read-write, neither open blocks (nor the helper's, of the other end).
    pricing = os.open(tmp_path / "pricing", os.O_RDWR)
    go = os.open(tmp_path / "go", os.O_RDWR)
    owner = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.invoice_run_helper_stub", str(tmp_path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert owner.stdout is not None
    out = owner.stdout.fileno()
    helper_pid = 0
    try:
        helper_pid = int(_read_within(out, STEP_DEADLINE_S))
        # The helper is pricing the batch it was handed ...
        assert _read_within(pricing, STEP_DEADLINE_S) == b"pricing\n"
        # ... when its owner is SIGKILLed (and its run's lock with it) ...
        owner.kill()
        owner.wait()
        # ... then the pricing ends.
        os.write(go, b"go\n")
        # The helper shares the owner's stdout: EOF once it has exited.
        while _read_within(out, STEP_DEADLINE_S):
            pass
        helper_pid = 0
    finally:
        owner.kill()
        owner.wait()
        if helper_pid:
            os.kill(helper_pid, signal.SIGKILL)
        os.close(pricing)
        os.close(go)
        owner.stdout.close()
        if owner.stdin is not None:
            owner.stdin.close()
    assert not (tmp_path / "appended").exists(), "appended after its owner was killed"
