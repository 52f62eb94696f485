"""The garbage collector's pace while billing day runs: a run allocates millions of small
objects, and CPython's cyclic collector, at its default pace (a collection per 700
allocations), took about 8 % of drafting's CPU and 15 % of numbering's. Reference counting
still frees almost everything at once, and the collector still runs, so memory stays flat."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

GC_GEN0_ALLOCATIONS = 50_000  # allocations between the collector's runs during a run


class _Collections:
    """The collector's setting, shared by every run and numbering of this process that is
    under way (a run started over HTTP while the scheduler numbers, say): the first to start
    saves the setting and lowers the pace, the last to end puts it back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[int, int, int] = gc.get_threshold()

    @contextlib.contextmanager
    def fewer(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = gc.get_threshold()
                gc.set_threshold(GC_GEN0_ALLOCATIONS, *self._saved[1:])
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    gc.set_threshold(*self._saved)


_COLLECTIONS = _Collections()


def fewer_collections() -> contextlib.AbstractContextManager[None]:
    """The collector runs once per GC_GEN0_ALLOCATIONS allocations while this lasts.
    Process-wide while any run lasts (the collector has one setting per process); the setting
    from before the first comes back when the last ends, however they overlap. Only in a process's main thread
    (the CLI's run, the bench, a helper process): a run in a server's thread (the API's 202
    path, the scheduler) leaves the setting to the process, which sets its own at start
    (infra/roles.py) and must keep it after the run."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    return _COLLECTIONS.fewer()
