"""Summarise a py-spy raw (collapsed stacks) profile written by `bench.ingest --profile DIR`.

`python -m bench.profile_summary DIR/batch.txt` prints, from the non-idle samples: the share of
each thread, the functions that are on CPU themselves (self), and the share of samples that pass
through each package or project module (inclusive, counted once per sample).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

TOP_N = 25
PROJECT_PACKAGES = ("api", "adapters", "projections", "domain", "infra")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _where(frame: str) -> tuple[str, str]:
    """(function, file) of one collapsed frame `func (path/file.py:line)`."""
    m = _FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def _package(file: str) -> str:
    parts = file.split("/")
    if parts[0] in PROJECT_PACKAGES:
        return file  # project code: per module
    return parts[0].removesuffix(".py") if parts[0] else "?"


def summarise(path: Path, top: int = TOP_N, thread_prefix: str = "") -> str:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):  # `thread (TID): NAME` with --threads
            thread = frames.pop(0).partition(": ")[2] or "?"
        if not frames or not thread.startswith(thread_prefix):
            continue
        total += count
        threads[re.sub(r"_\d+$", "_N", thread)] += count
        func, file = _where(frames[-1])
        self_time[f"{func} ({file})"] += count
        for name in {_package(_where(f)[1]) for f in frames}:
            inclusive[name] += count
    if not total:
        return f"{path}: no samples\n"

    def block(title: str, counter: Counter[str], n: int) -> list[str]:
        rows = [f"  {100 * c / total:5.1f}%  {name}" for name, c in counter.most_common(n)]
        return [title, *rows]

    only = f" of threads {thread_prefix}*" if thread_prefix else ""
    lines = [f"{path}: {total} samples{only}"]
    lines += block("threads (share of non-idle samples):", threads, top)
    lines += block("self (on CPU in this function):", self_time, top)
    lines += block("inclusive (samples through this package / project module):", inclusive, top)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=TOP_N)
    parser.add_argument("--thread", default="", help="only threads whose name starts with this")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top, args.thread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
