"""What a read model is: its tables, the events it handles, and how it applies one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import Cursor

Handler = Callable[[Cursor[Any], Any, int], None]


@dataclass(frozen=True)
class ReadModel:
    """A disposable view of the ledger. `apply` must be deterministic: a replay from position 0
    gives the same rows as the live model."""

    name: str
    ddl: tuple[str, ...]
    tables: tuple[str, ...]
    handlers: dict[type[Any], Handler] = field(default_factory=dict)

    def handles(self, event: Any) -> bool:
        return type(event) in self.handlers

    def apply(self, cur: Cursor[Any], event: Any, position: int) -> None:
        handler = self.handlers.get(type(event))
        if handler is not None:
            handler(cur, event, position)
