"""The replay engine: the ledger read again, in position order, into what every read model and
bill should be.

One REPEATABLE READ transaction holds one snapshot of the ledger and of the live read models.
The ledger is streamed through a server-side cursor (`REPLAY_FETCH_ROWS` rows per round trip,
so memory stays flat whatever its length) and decoded with msgspec:

- usage (almost every entry) is folded in memory by the usage projector's own fold
  (projections/usage_fold.Fold) into the buckets of `usage_totals` and `usage_unique`; the
  meters' rules change in ledger order, as they do for the projector;
- every other entry is applied by its read models' own handlers (`ReadModel.apply_all`) into a
  scratch schema created inside the transaction, which the ROLLBACK at the end removes.

Observers (callables of an event and its position) see every non-usage event as it is replayed:
the reconciliation's checks use them to note what the ledger says (invoice drafts, numbers,
payments). docs/RECONCILIATION.md says what is shared with the projectors and what is not."""

from __future__ import annotations

import contextlib
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from psycopg import sql

from adapters.codec import MsgspecMapper
from domain.meter import Meter
from domain.period import month_of
from domain.usage import MeterRule, Usage
from projections.base import ReadModel
from projections.usage_fold import Bucket, Fold, Totals, Unique, UsageView

REPLAY_FETCH_ROWS = 20_000  # ledger rows per round trip of the server-side cursor
REPLAY_PREFETCH_PAGES = 2  # pages read ahead while one is folded
READER_POLL_S = 0.1  # how often a reader blocked on a full queue checks it should stop
FOLD_CHUNK_ROWS = 20_000  # usage entries added to the fold before its runs are folded
SCRATCH_PREFIX = "replay_"
USAGE_TOPIC = get_topic(Usage.Recorded)
WHOLE_MODELS = ("plans", "organisations")
USAGE_MODEL = "usage_totals"  # folded in memory, not in the scratch schema
METER_TOPICS = frozenset({get_topic(Meter.Defined), get_topic(Meter.Redefined)})

Observer = Callable[[Any, int, "ReplayState"], None]
Progress = Callable[[int, int], None]  # (entries read, position reached)


@dataclass
class ReplayState:
    """What the replay holds while it runs and once it is done."""

    head: int  # the ledger position the snapshot covers
    scratch: str  # the scratch schema holding the replayed read models (until the rollback)
    organisation_id: UUID | None = None
    # A second scratch schema: the WHOLE_MODELS replayed up to the head, whatever their lag (what
    # the ledger says of plans and organisations, for pricing invoices afresh).
    whole: str = ""
    events: int = 0
    usage_events: int = 0
    fold: Fold = field(default_factory=Fold)
    rules: dict[str, MeterRule] = field(default_factory=dict)
    totals: dict[Bucket, Totals] = field(default_factory=dict)
    uniques: set[Unique] = field(default_factory=set)
    topics_seen: dict[str, int] = field(default_factory=dict)  # topic -> entries replayed
    # How far each read model had applied the ledger in the snapshot (its tracking row): it is
    # compared with the replay up to there, not with entries it has yet to apply.
    tracked: dict[str, int] = field(default_factory=dict)
    # (read model, topic) -> entries replayed into that model within the organisation filter
    # (an event without an organisation counts): the facts a check over that model must meet.
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    # Month totals per (organisation, month) as of `_months_at` usage events: an invoice run's
    # drafts, one after another, read them without merging the days again for each.
    _months: dict[tuple[UUID, date], tuple[dict[str, Totals], dict[str, set[str]]]] = field(
        default_factory=dict)
    _months_at: int = -1

    def fold_pending(self) -> None:
        self.fold.fold_runs(self.rules)

    def month_quantities(self, organisation_id: UUID, month_start: date) -> dict[str, Decimal]:
        """The organisation's quantity per meter for one month (local dates), all projects and
        groups together, from what is folded so far: what an invoice run prices."""
        self.fold_pending()
        if self._months_at != self.usage_events:  # usage folded since: merged again, once
            self._months = {}
            for (org, _project, metric, _key, day), t in self.fold.days.items():
                totals, _ = self._months.setdefault((org, month_of(day)), ({}, {}))
                totals.setdefault(metric, Totals({})).merge(t)
            for (org, _project, metric, _key, day), value in self.fold.uniques:
                _, values = self._months.setdefault((org, month_of(day)), ({}, {}))
                values.setdefault(metric, set()).add(value)
            self._months_at = self.usage_events
        merged, distinct = self._months.get((organisation_id, month_start), ({}, {}))
        out: dict[str, Decimal] = {}
        for metric, t in merged.items():
            rule = self.rules.get(metric)
            if rule is None or t.latest is None:
                continue
            if rule.aggregation == "count":
                out[metric] = Decimal(t.count)
            elif rule.aggregation == "sum":
                out[metric] = t.sum
            elif rule.aggregation == "max":
                out[metric] = t.max if t.max is not None else Decimal(0)
            elif rule.aggregation == "latest":
                out[metric] = t.latest[2]
            elif rule.aggregation == "unique_count":
                out[metric] = Decimal(len(distinct.get(metric, ())))
        return out


def ledger_query(table: sql.Composable) -> sql.Composed:
    """The ledger in position order up to a position, in binary (a state's bytes are not sent
    as hex): a usage entry's originator is not read (its view is all the fold needs)."""
    return sql.SQL(
        "SELECT notification_id, topic, state,"
        " CASE WHEN topic = %s THEN NULL ELSE originator_id END, originator_version"
        " FROM {} WHERE notification_id <= %s ORDER BY notification_id").format(table)


class ReplayFailed(Exception):
    """An entry the replay cannot decode or apply (what a projector dead-letters): a finding of
    the reconciliation at that position, not a crash of it."""

    def __init__(self, position: int, topic: str, error: BaseException) -> None:
        super().__init__(f"position {position} ({topic}): {type(error).__name__}: {error}")
        self.position = position
        self.topic = topic


def _rule_of(e: Meter.Defined | Meter.Redefined, code: str) -> MeterRule:
    return MeterRule(code, e.aggregation, e.field, tuple(e.group_by), e.allow_negative)


class Replayer:
    """Replays the ledger of one schema. `models`: the read models replayed into the scratch
    schema (the usage totals' meters among them); usage itself is folded in memory."""

    def __init__(self, database_url: str, schema: str, events_table: str,
                 models: Sequence[ReadModel], whole: Sequence[str] = WHOLE_MODELS) -> None:
        self._url = database_url
        self._schema = schema
        self._table = sql.Identifier(schema, events_table)
        self._models = tuple(models)
        self._mapper = MsgspecMapper()
        self._handled: dict[str, list[ReadModel]] = {}
        for model in self._models:
            for cls in model.handlers:
                if cls is not Usage.Recorded:
                    self._handled.setdefault(get_topic(cls), []).append(model)
        self._meter_codes: dict[UUID, str] = {}
        self._usage_limit = 0
        self._whole = frozenset(whole)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection inside one REPEATABLE READ transaction, rolled back on exit."""
        with psycopg.connect(self._url, options="-c statement_timeout=0") as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            try:
                yield conn
            finally:
                conn.rollback()

    def has_originator(self, conn: psycopg.Connection[Any], originator_id: UUID, topic: str
                       ) -> bool:
        """Whether the ledger holds an entry of `topic` for `originator_id` (e.g. that an
        organisation was ever created), in the snapshot `conn` holds."""
        return conn.execute(sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE originator_id = %s AND originator_version = 1"
            " AND topic = %s)").format(self._table), (originator_id, topic)).fetchone() == (True,)

    def run(self, conn: psycopg.Connection[Any], *, organisation_id: UUID | None = None,
            observers: Sequence[Observer] = (), progress: Progress | None = None) -> ReplayState:
        """Replay the whole ledger of the snapshot `conn` holds. The scratch schema stays until
        the snapshot's transaction ends: compare against it before that."""
        head_row = conn.execute(sql.SQL("SELECT COALESCE(max(notification_id), 0) FROM {}")
                                .format(self._table)).fetchone()
        head = int(head_row[0]) if head_row else 0
        scratch = f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
        whole = f"{scratch}_whole"
        for schema, models in ((whole, [m for m in self._models if m.name in self._whole]),
                               (scratch, self._models)):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
            for model in models:
                for statement in model.ddl:
                    conn.execute(statement)
        state = ReplayState(head, scratch, organisation_id, whole=whole)
        state.tracked = {m.name: 0 for m in self._models} | {
            str(name): int(position) for name, position in conn.execute(sql.SQL(
                "SELECT name, position FROM {}").format(
                sql.Identifier(self._schema, "projection_tracking"))).fetchall()}
        self._usage_limit = state.tracked.get(USAGE_MODEL, head)
        snapshot_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot_row is not None
        with conn.cursor() as cur:
            for page in self._pages(str(snapshot_row[0]), head):
                self._page(cur, state, page, observers)
                if progress is not None:
                    progress(state.events, int(page[-1][0]))
        self._finish(state)
        return state

    def _pages(self, snapshot: str, head: int) -> Iterator[list[Any]]:
        """The ledger's pages, read ahead by a thread of their own on a second connection in the
        same snapshot (`SET TRANSACTION SNAPSHOT`): the next page is fetched and converted while
        this one is folded. At most REPLAY_PREFETCH_PAGES pages wait: memory stays bounded."""
        pages: queue.Queue[list[Any] | BaseException] = queue.Queue(REPLAY_PREFETCH_PAGES)
        stop = threading.Event()

        def put(item: list[Any] | BaseException) -> None:
            while not stop.is_set():
                try:
                    pages.put(item, timeout=READER_POLL_S)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                with psycopg.connect(self._url, options="-c statement_timeout=0") as conn:
                    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                        sql.Literal(snapshot)))
                    with conn.cursor(name="replay_ledger", binary=True) as rows:
                        rows.itersize = REPLAY_FETCH_ROWS
                        rows.execute(ledger_query(self._table), (USAGE_TOPIC, head))
                        while not stop.is_set():
                            page = rows.fetchmany(REPLAY_FETCH_ROWS)
                            put(page)
                            if not page:
                                return
            except BaseException as e:  # handed to the folding thread, which raises it
                put(e)

        reader = threading.Thread(target=read, name="replay-reader", daemon=True)
        reader.start()
        try:
            while True:
                item = pages.get()
                if isinstance(item, BaseException):
                    raise item
                if not item:
                    return
                yield item
        finally:
            stop.set()
            reader.join()

    # ---- one page -----------------------------------------------------------------------

    def _page(self, cur: psycopg.Cursor[Any], state: ReplayState, page: list[Any],
              observers: Sequence[Observer]) -> None:
        state.events += len(page)
        usage: list[tuple[Any, int]] = []
        decode = _USAGE_VIEW.decode
        org = state.organisation_id.bytes if state.organisation_id is not None else None
        topics = state.topics_seen
        limit = self._usage_limit
        for position, topic, data, originator_id, version in page:
            if topic == USAGE_TOPIC:
                if position > limit:
                    continue
                try:
                    view = decode(data)
                except msgspec.DecodeError as e:
                    raise ReplayFailed(position, topic, e) from e
                if org is None or view.organisation_id == org:
                    usage.append((view, position))
                continue
            topics[topic] = topics.get(topic, 0) + 1
            if usage:  # what came before this entry is folded with the rules before it
                self._fold(state, usage)
                usage = []
            self._other(cur, state, position, topic, data, originator_id, version, observers)
        if usage:
            self._fold(state, usage)

    def _fold(self, state: ReplayState, usage: list[tuple[Any, int]]) -> None:
        state.usage_events += len(usage)
        state.topics_seen[USAGE_TOPIC] = state.topics_seen.get(USAGE_TOPIC, 0) + len(usage)
        state.fold.add_by_day(usage, state.rules)

    def _other(self, cur: psycopg.Cursor[Any], state: ReplayState, position: int, topic: str,
               data: bytes, originator_id: UUID, version: int,
               observers: Sequence[Observer]) -> None:
        models = self._handled.get(topic)
        if not models and not observers:
            return
        try:
            self._apply(cur, state, position, topic, data, originator_id, version, models,
                        observers)
        except Exception as e:
            raise ReplayFailed(position, topic, e) from e

    def _apply(self, cur: psycopg.Cursor[Any], state: ReplayState, position: int, topic: str,
               data: bytes, originator_id: UUID, version: int, models: list[ReadModel] | None,
               observers: Sequence[Observer]) -> None:
        event = self._mapper.to_domain_event(StoredEvent(
            originator_id=originator_id, originator_version=version, topic=topic, state=data))
        if topic in METER_TOPICS and position <= self._usage_limit:
            if isinstance(event, Meter.Defined):
                self._meter_codes[event.originator_id] = event.code
            code = self._meter_codes.get(event.originator_id)
            if code is not None:
                state.rules[code] = _rule_of(event, code)
        tracked = state.tracked
        event_org = getattr(event, "organisation_id", None)
        in_scope = state.organisation_id is None or event_org in (None, state.organisation_id)
        for model in models or ():
            if position <= tracked.get(model.name, 0):
                model.apply_all(cur, [(event, position)])
                if in_scope:
                    key = (model.name, topic)
                    state.applied[key] = state.applied.get(key, 0) + 1
            if model.name in self._whole:  # the ledger's own view, whatever the model's lag
                cur.execute(sql.SQL("SET LOCAL search_path = {}").format(
                    sql.Identifier(state.whole)))
                model.apply_all(cur, [(event, position)])
                cur.execute(sql.SQL("SET LOCAL search_path = {}").format(
                    sql.Identifier(state.scratch)))
        for observe in observers:
            observe(event, position, state)

    def _finish(self, state: ReplayState) -> None:
        """Day totals merged into months, as the projector's writes merge them."""
        state.totals, state.uniques = state.fold.take(state.rules)


_USAGE_VIEW = msgspec.msgpack.Decoder(UsageView)
assert getattr(Usage.Recorded, "class_version", 1) == 1, "usage views need no upcasting"
