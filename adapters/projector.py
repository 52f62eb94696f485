"""The projector runner: feeds one read model from its durable JetStream pull consumer.

Exactly-once effect: a read-model change and its tracking position commit in one Postgres
transaction; entries at or below the tracked position are skipped. Delivery order does not
matter: every relayed message names `prev`, the ledger position just before it, and when that is
ahead of the tracked position the missing entries are read from the ledger itself (the source of
truth), so redelivered or reordered messages can never make the tracking check skip an event.
A model whose topics all lie in one lane (adapters/bus.py) consumes only that lane's subjects
and chains by the lane's `prev`; the lane's watermarks bring its tracking up to the head.

A handler that fails is retried in place with exponential backoff (the message is kept in
progress, so nothing after it overtakes it); after the last retry the entry is dead-lettered:
copied to the DLQ stream with its error, recorded as a position the read model is missing,
counted, and the projector carries on. Infrastructure errors (Postgres or NATS away) never
dead-letter anything: the batch is nak'd with a delay and retried.

Tracking never moves past a position unless everything up to it is applied (docs/PROJECTIONS.md).
Skip-only messages (watermarks, ignored topics) advance a position in memory; the flush that
writes it advances the stored row only if that row still holds what this projector last wrote,
and otherwise (commits lost in a crash, a rebuild) fills the gap from the ledger first. A gap is
filled GAP_FILL_CHUNK_ROWS ledger rows per transaction, each committed with its tracking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg_pool import ConnectionPool

from adapters.bus import USAGE_LANE, DeadLetter, Entry, Streams, encode, lane_of
from adapters.codec import decode_view
from adapters.deliveries import Delivery, MessageReader
from adapters.ledger import LedgerStore
from adapters.pg import TRANSIENT
from projections.base import ReadModel

log = logging.getLogger("billing.projector")

FETCH_BATCH_MSGS = 64
# Usage messages hold up to a thousand entries each: fewer per fetch bounds the memory a
# projector of usage holds at once (decoded, ~8000 entries per transaction).
FETCH_BATCH_MSGS_WITH_USAGE = 8
FETCH_TIMEOUT_S = 1.0
ACK_WAIT_S = 30.0
MAX_DELIVER = 20  # JetStream's bound; handler retries below are bounded on their own
MAX_ACK_PENDING = 4 * FETCH_BATCH_MSGS
HANDLER_RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)
INFRA_RETRY_DELAY_S = 1.0
SKIP_FLUSH_INTERVAL_S = 0.05
GAP_READ_PAGE_ROWS = 5000
# Ledger rows of a gap applied per transaction: bounds the memory and the lock time of a fill
# after a long stream gap, and commits progress as it goes.
GAP_FILL_CHUNK_ROWS = 10_000
PUBLISH_TIMEOUT_S = 5.0

_LOCK_TRACKING = "SELECT position FROM projection_tracking WHERE name = %s FOR UPDATE"
# Forward only, and only from a row that holds at least `base` (the row lock makes the check and
# the write one step): a row below it has lost applied entries, which the ledger must fill first.
_ADVANCE_FROM = (
    "UPDATE projection_tracking SET position = %(target)s, updated_at = now()"
    " WHERE name = %(name)s AND position >= %(base)s AND position < %(target)s")


class TrackingBehind(Exception):
    """The stored tracking is below what this projector applied and wrote (its commits were lost,
    or a rebuild set it back): nothing may be applied on top; the work is retried from the row."""


@dataclass(frozen=True)
class Unit:
    """One ledger entry for the careful path, decoded there (a decoding error is the entry's,
    retried and dead-lettered like a handler's): a notification read from the ledger, a relayed
    entry, or a view already decoded from its message."""

    position: int
    topic: str
    stored: StoredEvent | Entry | None = None
    view: Any = None


class Projector:
    def __init__(
        self,
        model: ReadModel,
        ledger: LedgerStore,
        pool: ConnectionPool,
        js: JetStreamContext,
        streams: Streams,
        retry_backoff_s: Sequence[float] = HANDLER_RETRY_BACKOFF_S,
    ) -> None:
        self.model = model
        self._ledger = ledger
        self._pool = pool
        self._js = js
        self._streams = streams
        self._backoff = tuple(retry_backoff_s)
        self.applied_entries = 0
        self.dead_lettered = 0
        # Entries of other topics are skipped without decoding them.
        self._topics = frozenset(get_topic(cls) for cls in model.handlers)
        self._views = {get_topic(cls): (cls, view) for cls, view in model.views.items()}
        # A model that needs one lane only consumes that lane, chained by the lane's prev.
        lanes = {lane_of(t) for t in self._topics}
        self._fetch_batch = FETCH_BATCH_MSGS_WITH_USAGE if USAGE_LANE in lanes else FETCH_BATCH_MSGS
        self._lane = lanes.pop() if len(lanes) == 1 else None
        # A message's entries decode straight into the model's view, unless upcasters must run.
        self._reader = MessageReader(model.name, self._topics, self._lane, {
            topic: view for topic, (cls, view) in self._views.items()
            if getattr(cls, "class_version", 1) == 1})
        # Positions up to which the chain of messages is known (_contiguous) and written to the
        # tracking row (_persisted); 0 until this projector's first transaction says otherwise.
        self._contiguous = 0
        self._persisted = 0
        self._caught_up_at_start = False  # the first idle moment checks the ledger head once
        self._flushed_at = 0.0

    # ---- the consumer loop -------------------------------------------------------------

    async def subscribe(self) -> JetStreamContext.PullSubscription:
        subject = (self._streams.ledger_wildcard if self._lane is None
                   else self._streams.lane_wildcard(self._lane))
        durable = self._streams.consumer(self.model.name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await self._js.consumer_info(self._streams.ledger, durable)
            if info.config.filter_subject != subject:
                # Made for other subjects (an older version): start afresh. The tracking
                # position in Postgres, not the consumer, says what is applied.
                await self._js.delete_consumer(self._streams.ledger, durable)
        return await self._js.pull_subscribe(
            subject,
            durable=durable,
            stream=self._streams.ledger,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_S,
                max_deliver=MAX_DELIVER,
                max_ack_pending=MAX_ACK_PENDING,
            ),
        )

    async def run(self, stop: asyncio.Event) -> None:
        sub: JetStreamContext.PullSubscription | None = None
        while not stop.is_set():
            try:
                if sub is None:
                    sub = await self.subscribe()
                msgs = await sub.fetch(self._fetch_batch, timeout=FETCH_TIMEOUT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                try:
                    await self._flush(idle=True)
                except Exception as e:  # kept in memory: the next flush tries again
                    log.warning("projector %s cannot flush: %s: %s", self.model.name,
                                type(e).__name__, e)
                continue  # an idle fetch; nats-py raises either kind
            except Exception as e:  # broker away: keep trying, ledger keeps everything
                log.warning("projector %s cannot fetch: %s: %s", self.model.name, type(e).__name__, e)
                sub = None
                await _wait(stop, INFRA_RETRY_DELAY_S)
                continue
            try:
                await self.handle(msgs)
            except Exception:  # never the end of the projector: unacked, they come back
                log.exception("projector %s could not handle %d messages; they will be"
                              " redelivered", self.model.name, len(msgs))
                await _wait(stop, INFRA_RETRY_DELAY_S)

    def _skip_only(self, batches: Sequence[Delivery]) -> bool:
        """Messages of ignored topics that continue the chain we know: advance in memory only
        (written by _flush), instead of a transaction per message for nothing."""
        if not batches or any(b.entries for b in batches):
            return False
        chain = self._contiguous
        for batch in sorted(batches, key=lambda b: b.last):
            if batch.prev > chain:
                return False  # a gap: let the normal path fill it from the ledger
            chain = max(chain, batch.last)
        self._contiguous = chain
        return True

    async def _flush(self, idle: bool) -> None:
        """Persist the in-memory position of skipped messages: when idle, or every
        SKIP_FLUSH_INTERVAL_S, so readers waiting for this model are not held up for long.

        The skip chain says nothing in (_persisted, _contiguous] is for this model; the row says
        what is applied. So tracking moves to _contiguous only from a row at _persisted or
        above (one statement, as before). A row below it lost entries this projector applied:
        they are filled from the ledger, in the transactions that then move the row."""
        now = time.monotonic()
        if self._contiguous <= self._persisted:
            if idle and self._persisted:
                await self._check_behind()
            elif idle and not self._caught_up_at_start:
                await self._catch_up_at_start()
            return
        if not idle and now - self._flushed_at < SKIP_FLUSH_INTERVAL_S:
            return
        self._flushed_at = now
        base, target = self._persisted, self._contiguous
        if await asyncio.to_thread(self._advance, base, target):
            return
        log.warning("projector %s: tracking is below %d, which it applied (lost commits or a"
                    " rebuild): filling from the ledger", self.model.name, base)
        # `prev` = base: the ledger fills up to there, the chain covers the rest up to target.
        await self._apply([None], [Delivery(base, base + 1, target)])

    async def _catch_up_at_start(self) -> None:
        """A fresh process's first idle moment: it remembers nothing it wrote, so commits lost
        with a crash (acked, never redelivered) would wait for the next write to the ledger.
        Once, the ledger up to its head is applied from the ledger (the few entries since the
        last watermark, after a clean stop)."""
        tracked, head = await asyncio.to_thread(lambda: (self._tracked(), self._ledger.head()))
        if tracked < head:
            log.info("projector %s: catching up from the ledger, %d to %d", self.model.name,
                     tracked, head)
            await self._apply([None], [Delivery(head, head, head)])
        self._caught_up_at_start = True

    async def _check_behind(self) -> None:
        """Idle (once a fetch timeout, not per message): a row below what this projector wrote
        lost commits in a crash that no message will bring back (JetStream dropped the relay's
        resends as duplicates), so they are filled from the ledger now, not at the next message."""
        persisted = self._persisted
        if await asyncio.to_thread(self._tracked) >= persisted:
            return
        log.warning("projector %s: tracking is below %d, which it applied (lost commits or a"
                    " rebuild): filling from the ledger", self.model.name, persisted)
        await self._apply([None], [Delivery(persisted, persisted, persisted)])

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Apply a fetched batch, then ack it. Safe to call with any order or repeats."""
        batches = [self._reader.read(m) for m in msgs]
        if self._skip_only(batches):
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.ack()
            with contextlib.suppress(*TRANSIENT, TrackingBehind):  # kept; the next flush writes it
                await self._flush(idle=False)
            return
        try:
            await self._apply(msgs, batches)
        except (*TRANSIENT, nats.errors.Error, TimeoutError, TrackingBehind) as e:
            log.warning("projector %s will retry: %s: %s", self.model.name, type(e).__name__, e)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=INFRA_RETRY_DELAY_S)
            return
        for msg in msgs:
            with contextlib.suppress(Exception):  # an ack lost is a harmless redelivery
                await msg.ack()

    async def _apply(self, msgs: Sequence[Msg | None], batches: Sequence[Delivery]) -> None:
        """All together, or (a handler failed) entry by entry with retries and dead letters."""
        try:
            await asyncio.to_thread(self._apply_together, batches)
        except (*TRANSIENT, TrackingBehind):
            raise
        except Exception:
            # Somebody's handler failed: find which entry, retry it, dead-letter it.
            for msg, batch in zip(msgs, batches, strict=True):
                await self._apply_carefully(msg, batch)

    # ---- applying, all in one transaction (the fast path) -------------------------------

    def _apply_together(self, batches: Sequence[Delivery]) -> None:
        """The batches, and the ledger entries they assume: one transaction, or one for every
        GAP_FILL_CHUNK_ROWS rows of a long gap (each commits its rows and tracking)."""
        ordered = sorted(batches, key=lambda b: b.last)
        while not self._apply_chunk(ordered):
            pass

    def _apply_chunk(self, ordered: Sequence[Delivery]) -> bool:
        """One transaction from the tracked position on. False when a gap's chunk ended it (its
        progress committed; call again), True when the batches are applied."""
        done = True
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            tracked = self._lock_tracking(cur)
            start = tracked
            items: list[tuple[Any, int]] = []
            budget = GAP_FILL_CHUNK_ROWS
            for batch in ordered:
                if batch.last <= tracked:
                    continue
                if batch.prev > tracked:  # what this message assumes we have: from the ledger
                    tracked, budget = self._fill(items, tracked, batch.prev, budget)
                    if tracked < batch.prev:
                        done = False  # the chunk is full: commit it, go on in the next
                        break
                items += self._items(batch, tracked)
                tracked = max(tracked, batch.last)
            self.model.apply_all(cur, items)
            if tracked != start:
                self._set_tracking(cur, tracked)
        self.applied_entries += len(items)
        self._committed(tracked)
        return done

    def _fill(self, items: list[tuple[Any, int]], tracked: int, upto: int, budget: int
              ) -> tuple[int, int]:
        """Add the model's ledger entries in (tracked, upto] to `items`, reading at most `budget`
        rows. Returns the position reached (upto when the range is read whole) and the budget
        left."""
        while tracked < upto:
            if budget <= 0:
                return tracked, 0
            page = self._ledger.read_after(tracked, min(GAP_READ_PAGE_ROWS, budget), stop=upto)
            if not page:
                break
            budget -= len(page)
            items += [(self._load(Unit(n.id, n.topic, n)), n.id)
                      for n in page if n.topic in self._topics]
            tracked = page[-1].id
        return upto, budget

    def _items(self, batch: Delivery, tracked: int) -> list[tuple[Any, int]]:
        """The (event or view, position) pairs of a message's entries after `tracked`."""
        entries = batch.entries
        if batch.first <= tracked:
            entries = [e for e in entries if e.position > tracked]
        if batch.views:
            return [(e.state, e.position) for e in entries]
        return [(self._load(u), u.position) for u in map(self._unit_of(batch), entries)
                if u.topic in self._topics]

    def _unit_of(self, batch: Delivery) -> Any:
        if batch.views:
            return lambda e: Unit(e.position, batch.topic, view=e.state)
        if batch.topic:
            return lambda e: Unit(e.position, batch.topic, e.stored(batch.topic))
        return lambda e: Unit(e.position, e.topic, e)  # format 1: a whole Entry

    def _load(self, unit: Unit) -> Any:
        """The unit's event, or the model's view of it."""
        if unit.view is not None:
            return unit.view
        assert unit.stored is not None
        view = self._views.get(unit.topic)
        if view is not None:
            return decode_view(view[0], view[1], unit.stored.state)
        return self._ledger.decode(unit.stored)  # type: ignore[arg-type]

    def _missing_before(self, tracked: int, batch: Delivery) -> Iterator[list[Unit]]:
        """Ledger entries of the model's topics in (tracked, batch.prev], a page at a time: what
        this message assumes we already have."""
        while tracked < batch.prev:
            page = self._ledger.read_after(tracked, GAP_READ_PAGE_ROWS, stop=batch.prev)
            if not page:
                return
            yield [Unit(n.id, n.topic, n) for n in page if n.topic in self._topics]
            tracked = page[-1].id

    def _lock_tracking(self, cur: psycopg.Cursor[Any]) -> int:
        """Lock this model's tracking row for the transaction and read it: one round trip
        (the row is made once, the first time). A read model is disposable and its tracking
        row commits with its rows, so the projector's pool need not wait for the WAL flush
        (`projection_pool`): a crash loses only whole recent transactions, applied again
        after it (redelivery or the ledger gap fill). The ledger itself does wait."""
        name = self.model.name
        row = cur.execute(_LOCK_TRACKING, (name,)).fetchone()
        if row is None:
            cur.execute("INSERT INTO projection_tracking (name, position) VALUES (%s, 0)"
                        " ON CONFLICT (name) DO NOTHING", (name,))
            row = cur.execute(_LOCK_TRACKING, (name,)).fetchone()
        assert row is not None
        return int(row[0])

    def _set_tracking(self, cur: psycopg.Cursor[Any], position: int) -> None:
        cur.execute(
            "UPDATE projection_tracking SET position = %s, updated_at = now() WHERE name = %s",
            (position, self.model.name),
        )

    # ---- applying entry by entry, with retries and dead letters (the careful path) ------

    async def _apply_carefully(self, msg: Msg | None, batch: Delivery) -> None:
        """Entry by entry, each with its tracking; `after` is where the chain must be before the
        next one (a row found below it raises TrackingBehind: the work is retried from the row)."""
        tracked = await asyncio.to_thread(self._tracked)
        if batch.last <= tracked:
            return
        after = tracked
        pages = self._missing_before(tracked, batch)
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            for unit in page:  # a page at a time: a long gap is never held whole
                await self._apply_with_retries(msg, unit, after)
                after = unit.position
        for unit in map(self._unit_of(batch), batch.entries):
            if unit.position > after and unit.topic in self._topics:
                await self._apply_with_retries(msg, unit, after)
                after = unit.position
        if not await asyncio.to_thread(self._advance, after, batch.last):
            raise TrackingBehind(f"{self.model.name}: tracking below {after}")

    def _advance(self, base: int, target: int) -> bool:
        """Tracking up to `target`, where nothing in (base, target] is to be applied, if the row
        holds `base` or more: one statement (one round trip on the projectors' autocommit pool),
        which never moves it back. False when the row is below `base`."""
        params = {"name": self.model.name, "base": base, "target": target}
        with self._pool.connection() as conn:
            if conn.execute(_ADVANCE_FROM, params).rowcount:
                self._committed(target)
                return True
            row = conn.execute("SELECT position FROM projection_tracking WHERE name = %s",
                               (self.model.name,)).fetchone()
            if row is None and base == 0:  # no row yet, and nothing before target is ours
                conn.execute("INSERT INTO projection_tracking (name, position) VALUES (%s, %s)"
                             " ON CONFLICT (name) DO NOTHING", (self.model.name, 0))
                return self._advance(base, target)
        stored = int(row[0]) if row else 0
        if stored >= target:  # a rebuild, or another transaction, went further
            self._committed(target)
            return True
        return False

    def _committed(self, position: int) -> None:
        """A transaction made `position` durable-enough: the chain is known up to there."""
        self._persisted = max(self._persisted, position)
        self._contiguous = max(self._contiguous, position)

    def _tracked(self) -> int:
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT position FROM projection_tracking WHERE name = %s", (self.model.name,)
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0

    def _apply_alone(self, unit: Unit, after: int, error: str | None = None, attempts: int = 0
                     ) -> None:
        """Apply one entry (or, with `error`, record it as dead) with its tracking row, on a row
        at `after` or above (nothing between is the model's)."""
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            stored = self._lock_tracking(cur)
            if stored >= unit.position:
                return
            if stored < after:
                raise TrackingBehind(f"{self.model.name}: tracking {stored} below {after}")
            if error is None:
                if unit.topic in self._topics:
                    self.model.apply_all(cur, [(self._load(unit), unit.position)])
            else:
                cur.execute(
                    "INSERT INTO projection_dead_letters (name, position, topic, error, attempts)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name, position) DO NOTHING",
                    (self.model.name, unit.position, unit.topic, error, attempts),
                )
            self._set_tracking(cur, unit.position)
        self._committed(unit.position)

    async def _apply_with_retries(self, msg: Msg | None, unit: Unit, after: int) -> None:
        error = ""
        for attempt in range(len(self._backoff) + 1):
            try:
                await asyncio.to_thread(self._apply_alone, unit, after)
                self.applied_entries += 1
                return
            except (*TRANSIENT, TrackingBehind):
                raise
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:2000]
                log.warning("projector %s failed at position %d (attempt %d): %s",
                            self.model.name, unit.position, attempt + 1, error)
                if attempt < len(self._backoff):
                    await asyncio.sleep(self._backoff[attempt])
                    if msg is not None:  # None: a flush's fill, whose messages are acked
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
        attempts = len(self._backoff) + 1
        letter = DeadLetter(self.model.name, unit.position, unit.topic, error, attempts)
        await self._js.publish(
            self._streams.dlq_subject(self.model.name),
            encode(letter),
            timeout=PUBLISH_TIMEOUT_S,
            stream=self._streams.dlq,
            headers={"Nats-Msg-Id": f"{self.model.name}:{unit.position}"},
        )
        await asyncio.to_thread(self._apply_alone, unit, after, error, attempts)
        self.dead_lettered += 1
        log.error("projector %s dead-lettered position %d: %s", self.model.name, unit.position, error)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
