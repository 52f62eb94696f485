"""What a read model is: its tables, the events it handles, and how it applies one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import Cursor

Handler = Callable[[Cursor[Any], Any, int], None]
BatchHandler = Callable[[Cursor[Any], list[tuple[Any, int]]], None]


@dataclass(frozen=True)
class ReadModel:
    """A disposable view of the ledger. `apply` must be deterministic: a replay from position 0
    gives the same rows as the live model."""

    name: str
    ddl: tuple[str, ...]
    tables: tuple[str, ...]
    handlers: dict[type[Any], Handler] = field(default_factory=dict)
    # A model that folds many events into few rows applies a whole batch at once (same result
    # as applying them one by one, in order); it receives only the events it handles.
    batch: BatchHandler | None = None

    def handles(self, event: Any) -> bool:
        return type(event) in self.handlers

    def apply(self, cur: Cursor[Any], event: Any, position: int) -> None:
        self.apply_all(cur, [(event, position)])

    def apply_all(self, cur: Cursor[Any], items: list[tuple[Any, int]]) -> None:
        mine = [(e, p) for e, p in items if type(e) in self.handlers]
        if not mine:
            return
        if self.batch is not None:
            self.batch(cur, mine)
            return
        for event, position in mine:
            self.handlers[type(event)](cur, event, position)
