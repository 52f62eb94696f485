"""What a read model is: its tables, the events it handles, and how it applies one; and how its
queries hand rows out (as the frozen msgspec Structs each projection module defines)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from psycopg import Connection, Cursor, sql
from psycopg.rows import dict_row

Handler = Callable[[Cursor[Any], Any, int], None]
Row = TypeVar("Row", bound=msgspec.Struct)
Query = str | bytes | sql.Composed


def one_row(conn: Connection[Any], row: type[Row], query: Query, params: Any = None) -> Row | None:
    """The query's first row as a `row` Struct (its columns named as the Struct's fields), or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        found = cur.fetchone()
    return None if found is None else msgspec.convert(found, row)


def all_rows(conn: Connection[Any], row: type[Row], query: Query, params: Any = None) -> list[Row]:
    """Every row of the query as `row` Structs (its columns named as the Struct's fields)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return [msgspec.convert(found, row) for found in cur.fetchall()]


def require_row(cur: Cursor[Any], what: str, ident: Any) -> None:
    """After an UPDATE of one row: it must have found its row. Never a silent no-op: a row that
    is missing had its creation dead-lettered, and the update is dead-lettered with it."""
    if cur.rowcount != 1:
        raise LookupError(f"{what} {ident} is not in the read model")
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
    # Events the model reads only a few fields of: event class -> a msgspec Struct naming those
    # fields (a subset of the event's). The projector may hand the model such a view instead of
    # the whole event (much cheaper to decode); a rebuild may hand it the event. Both must work.
    views: dict[type[Any], type[Any]] = field(default_factory=dict)
    # Events whose effect does not depend on the order they are applied in (a fold's counts and
    # sums): a dead letter of only these may be re-driven on its own, after later entries. Any
    # other dead letter is re-driven by a rebuild, which applies everything in ledger order.
    order_free: frozenset[type[Any]] = frozenset()
    accepted: frozenset[type[Any]] = field(init=False)  # handled events and their views

    def __post_init__(self) -> None:
        assert self.views.keys() <= self.handlers.keys(), "a view stands in for a handled event"
        assert not self.views or self.batch is not None, "views are applied in batches"
        object.__setattr__(self, "accepted", frozenset(self.handlers) | frozenset(self.views.values()))

    def handles(self, event: Any) -> bool:
        return type(event) in self.accepted

    def apply(self, cur: Cursor[Any], event: Any, position: int) -> None:
        self.apply_all(cur, [(event, position)])

    def apply_all(self, cur: Cursor[Any], items: list[tuple[Any, int]]) -> None:
        accepted = self.accepted
        mine = [item for item in items if type(item[0]) in accepted]
        if not mine:
            return
        if self.batch is not None:
            self.batch(cur, mine)
            return
        for event, position in mine:
            self.handlers[type(event)](cur, event, position)
