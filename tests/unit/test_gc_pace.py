"""A run lowers the garbage collector's pace while it lasts (adapters.gc_pace.
fewer_collections); runs that overlap in one process (a run over HTTP while the scheduler
numbers) put back the setting from before the first, whichever ends first."""

from __future__ import annotations

import gc

from adapters.gc_pace import GC_GEN0_ALLOCATIONS, fewer_collections


def test_overlapping_runs_restore_the_collectors_setting_from_before_the_first() -> None:
    before = gc.get_threshold()
    first, second = fewer_collections(), fewer_collections()
    first.__enter__()
    assert gc.get_threshold()[0] == GC_GEN0_ALLOCATIONS
    second.__enter__()
    first.__exit__(None, None, None)  # the first ends while the second still runs
    assert gc.get_threshold()[0] == GC_GEN0_ALLOCATIONS
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_a_run_that_fails_restores_the_collectors_setting() -> None:
    before = gc.get_threshold()
    try:
        with fewer_collections():
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before
