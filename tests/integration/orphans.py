"""Processes a test started that outlive it, read from /proc (psutil is not installed): a
process's descendants (taken before it is SIGKILLed, since the kernel then gives them to
another parent), and every live process whose command line names a string (the test's own
schema, which is on its children's command lines and on any forked from them). A process is
known by its pid and its start time, so a pid used again later is not taken for it; zombies
count as gone."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process, None once it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid ..." where comm may hold spaces and parentheses: split after the
    # last ")"; the start time is field 22 of the line, the 20th after comm.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def descendants(pid: int) -> set[Proc]:
    """Every live process below `pid` (children, theirs, ...), read in one pass over /proc."""
    children: dict[int, list[Proc]] = {}
    for other in _pids():
        stat = _stat(other)
        if stat is not None and stat[0] != "Z":
            children.setdefault(stat[1], []).append((other, stat[2]))
    out: set[Proc] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child[0])
    return out


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of `procs` still running (same pid and start time, not a zombie)."""
    out = set()
    for pid, started in procs:
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == started:
            out.add((pid, started))
    return out


def naming(text: str) -> dict[int, str]:
    """Live processes (not this one, not zombies) whose command line contains `text`: pid ->
    command line."""
    out = {}
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            raw = (PROC / str(pid) / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        line = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        stat = _stat(pid)
        if text in line and stat is not None and stat[0] != "Z":
            out[pid] = line
    return out
