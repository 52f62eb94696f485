"""NATS JetStream: the LEDGER and DLQ streams, and the wire format of relayed ledger entries.

A relayed message carries one or more consecutive ledger entries of one topic, and `prev`, the
position of the ledger entry just before its first one. A projector uses `prev` to know whether
it has everything before the message (see adapters/projector.py).

The body (format `entries-v2`, header `Ledger-Format`) is a msgpack array of entries, each
`[position, originator_id (16 bytes), originator_version, state]`, where `state` is the stored
state itself (msgpack already), not wrapped in bytes: a reader decodes a whole message, the
fields it needs of every state included, in one call. Postgres writes each entry's bytes as it
reads the row (`ENTRY_SQL`), so the relay never handles an entry one by one. The topic, `prev`
and the positions travel in headers. (Format 1, a msgpack `RelayedBatch`, is still read.)

Entries travel in two lanes, by subject: usage (the bulk) and domain (everything else). A
message also names its lane's `prev` (the last position of the lane's previous message), so a
projector that needs one lane only consumes that lane's subjects and still sees every gap. A
watermark (headers only) tells a lane that nothing of it happened up to a position, so that its
projectors' tracking reaches the ledger head while the other lane is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from uuid import UUID

import msgspec
import nats
from eventsourcing.utils import get_topic
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, Placement, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, ServiceUnavailableError
from psycopg import sql

from domain.usage import Usage

LEDGER_RETENTION_S = 7 * 24 * 3600
DLQ_RETENTION_S = 90 * 24 * 3600
DUPLICATE_WINDOW_S = 600
MAX_MESSAGE_BYTES = 900_000  # below nats-server's default 1 MiB max_payload
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5
# A JetStream cluster that is still electing its meta leader (every node just started, or the
# leader just died) answers stream requests with timeouts: keep asking, this long at most.
STREAMS_READY_DEADLINE_S = 60.0
STREAMS_RETRY_PAUSE_S = 0.5

log = logging.getLogger("billing.bus")
MAX_PENDING_BYTES = 8 * 1024 * 1024
PREV_HEADER = "Ledger-Prev"  # position before the message's first entry
TOPIC_HEADER = "Ledger-Topic"  # the one topic of every entry in the message
LANE_PREV_HEADER = "Ledger-Lane-Prev"  # last position of the lane's previous message
LANE_HEADER = "Ledger-Lane"  # on a watermark: the lane it speaks for
LAST_HEADER = "Ledger-Last"  # on a watermark: the lane has nothing more up to this position
WATERMARK = "ledger:Watermark"  # the topic header of a watermark (no entries, headers only)
FORMAT_HEADER = "Ledger-Format"
ENTRIES_FORMAT = "entries-v2"
USAGE_LANE = "usage"
DOMAIN_LANE = "domain"
LANES = (USAGE_LANE, DOMAIN_LANE)
_USAGE_TOPICS = frozenset({get_topic(Usage.Recorded)})


def lane_of(topic: str) -> str:
    return USAGE_LANE if topic in _USAGE_TOPICS else DOMAIN_LANE


class Entry(msgspec.Struct, array_like=True, frozen=True):
    position: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


class RelayedBatch(msgspec.Struct, array_like=True, frozen=True):
    prev: int
    entries: list[Entry]
    # Set only when the entries were not decoded (a topic the reader ignores): then the
    # positions come from the message headers.
    first_: int = 0
    last_: int = 0
    lane_prev: int = 0

    @property
    def first(self) -> int:
        return self.entries[0].position if self.entries else self.first_

    @property
    def last(self) -> int:
        return self.entries[-1].position if self.entries else self.last_


class WireEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One entry of an `entries-v2` body, its state left undecoded."""

    position: int
    originator_id: UUID
    originator_version: int
    state: msgspec.Raw

    def stored(self, topic: str) -> Entry:
        """As the mapper reads it."""
        return Entry(self.position, self.originator_id, self.originator_version, topic,
                     bytes(self.state))


# The msgpack bytes of one `entries-v2` entry, computed by Postgres from a row of the library's
# events table: a 4-array of int 64 (0xd3), bin 8 of 16 bytes (0xc4 0x10), int 64, the state as is.
ENTRY_SQL = sql.SQL(
    "'\\x94d3'::bytea || int8send(notification_id) || '\\xc410'::bytea"
    " || uuid_send(originator_id) || '\\xd3'::bytea || int8send(originator_version::int8)"
    " || state")


def entries_header(count: int) -> bytes:
    """What precedes `count` entries in an `entries-v2` body (msgpack array 32: 0xdd, count)."""
    return b"\xdd" + count.to_bytes(4, "big")


def entries_body(entries: list[bytes]) -> bytes:
    """An `entries-v2` body from entries as `ENTRY_SQL` made them."""
    return entries_header(len(entries)) + b"".join(entries)


_raw_entries = msgspec.msgpack.Decoder(list[WireEntry])


@lru_cache(maxsize=64)
def entries_decoder(view: type | None) -> msgspec.msgpack.Decoder[Any]:
    """Decodes an `entries-v2` body: states left raw (`WireEntry`), or decoded straight into a
    view (a msgspec Struct naming some of the event's fields; each entry then has `position`
    and `state`, the view, and the originator's id as 16 bytes)."""
    if view is None:
        return _raw_entries
    entry = msgspec.defstruct(f"{view.__name__}Entry", [
        ("position", int), ("originator_id", bytes), ("originator_version", int), ("state", view),
    ], array_like=True, frozen=True, gc=False)  # no cycles; untracked: decoded by the thousand
    return msgspec.msgpack.Decoder(list[entry])  # type: ignore[valid-type]


class DeadLetter(msgspec.Struct, frozen=True):
    projection: str
    position: int
    topic: str
    error: str
    attempts: int


_encoder = msgspec.msgpack.Encoder(uuid_format="bytes")
_batch_decoder = msgspec.msgpack.Decoder(RelayedBatch)
_dead_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def decode_batch(data: bytes) -> RelayedBatch:
    return _batch_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(data)


@dataclass(frozen=True)
class Streams:
    """Stream and subject names; a prefix isolates tests sharing one server. `replicas` and
    `placement_tags` place the streams on a JetStream cluster (R3 in production: a stream
    survives the loss of one node); 1 and none on a single server."""

    prefix: str = ""
    replicas: int = 1
    placement_tags: tuple[str, ...] = ()

    @property
    def ledger(self) -> str:
        return f"{self.prefix}LEDGER"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}DLQ"

    def ledger_subject(self, topic: str) -> str:
        # "domain.organisation:Organisation.Created"
        #   -> "ledger.domain.domain.organisation.Organisation.Created" (lane, then topic)
        return f"{self.prefix.lower()}ledger.{lane_of(topic)}.{topic.replace(':', '.')}"

    def watermark_subject(self, lane: str) -> str:
        assert lane in LANES
        return f"{self.prefix.lower()}ledger.{lane}.watermark"

    def lane_wildcard(self, lane: str) -> str:
        assert lane in LANES
        return f"{self.prefix.lower()}ledger.{lane}.>"

    @property
    def ledger_wildcard(self) -> str:
        return f"{self.prefix.lower()}ledger.>"

    def dlq_subject(self, projection: str) -> str:
        return f"{self.prefix.lower()}dlq.{projection}"

    @property
    def dlq_wildcard(self) -> str:
        return f"{self.prefix.lower()}dlq.>"

    def consumer(self, projection: str) -> str:
        return f"{self.prefix}proj-{projection}"


async def connect(url: str, name: str) -> NatsClient:
    """Connect, and keep reconnecting forever: NATS being away never loses ledger data."""
    # NATS_URL may name several servers of a cluster, comma-separated: the client tries each
    # (and learns the rest of the cluster from the one it reaches).
    servers = [u.strip() for u in url.split(",") if u.strip()]
    return await nats.connect(
        servers,
        name=name,
        connect_timeout=CONNECT_TIMEOUT_S,
        reconnect_time_wait=RECONNECT_WAIT_S,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        pending_size=MAX_PENDING_BYTES,
    )


async def ensure_streams(js: JetStreamContext, streams: Streams) -> None:
    """Create or update both streams; safe to call from every process at start."""
    placement = Placement(tags=list(streams.placement_tags)) if streams.placement_tags else None
    configs = [
        StreamConfig(
            name=streams.ledger,
            subjects=[streams.ledger_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=LEDGER_RETENTION_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            discard=DiscardPolicy.OLD,
            max_msg_size=MAX_MESSAGE_BYTES + 64 * 1024,
            num_replicas=streams.replicas,
            placement=placement,
        ),
        StreamConfig(
            name=streams.dlq,
            subjects=[streams.dlq_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=DLQ_RETENTION_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=streams.replicas,
            placement=placement,
        ),
    ]
    end = time.monotonic() + STREAMS_READY_DEADLINE_S
    for config in configs:
        while True:
            try:
                try:
                    await js.add_stream(config)
                except BadRequestError:
                    await js.update_stream(config)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    ServiceUnavailableError) as e:
                if time.monotonic() > end:
                    raise
                log.warning("JetStream not ready for stream %s (will retry): %s",
                            config.name, type(e).__name__)
                await asyncio.sleep(STREAMS_RETRY_PAUSE_S)
