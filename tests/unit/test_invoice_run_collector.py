"""Issue 19 review: the invoice run's collector setting (adapters/gc_pace.fewer_collections)
is process-wide. A served process (`billing serve`: the API and the scheduler in one) sets its
own at start (infra/roles.py, tune_gc) after the scheduler is started, whose invoice run of the
periods it missed starts at once in a thread: that run must not put back, when it ends, the
setting from before the process tuned itself. Only a process's main thread (the CLI's run, the
bench, a helper process) changes the setting for a run."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from adapters.gc_pace import GC_GEN0_ALLOCATIONS, fewer_collections

PROCESS_SETTING = 12_345  # what the process sets for itself while a run lasts
JOIN_TIMEOUT_S = 10.0


@pytest.fixture
def threshold() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    yield gc.get_threshold()
    gc.set_threshold(*before)


def test_a_run_in_a_thread_leaves_the_process_its_own_collector_setting(
    threshold: tuple[int, int, int]
) -> None:
    entered, tuned = threading.Event(), threading.Event()

    def run() -> None:
        with fewer_collections():
            entered.set()
            tuned.wait(JOIN_TIMEOUT_S)

    thread = threading.Thread(target=run)
    thread.start()
    assert entered.wait(JOIN_TIMEOUT_S)
    gc.set_threshold(PROCESS_SETTING, *threshold[1:])  # infra/roles.py's tune_gc, meanwhile
    tuned.set()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive()
    assert gc.get_threshold()[0] == PROCESS_SETTING


def test_a_run_in_the_main_thread_collects_less_often_and_puts_the_setting_back(
    threshold: tuple[int, int, int]
) -> None:
    with fewer_collections():
        assert gc.get_threshold() == (GC_GEN0_ALLOCATIONS, *threshold[1:])
    assert gc.get_threshold() == threshold
