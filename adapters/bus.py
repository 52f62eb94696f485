"""NATS JetStream: the LEDGER and DLQ streams, and the wire format of relayed ledger entries.

A relayed message carries one or more consecutive ledger entries of one topic, and `prev`, the
position of the ledger entry just before its first one. A projector uses `prev` to know whether
it has everything before the message (see adapters/projector.py).

Entries travel in two lanes, by subject: usage (the bulk) and domain (everything else). A
message also names its lane's `prev` (the last position of the lane's previous message), so a
projector that needs one lane only consumes that lane's subjects and still sees every gap. A
watermark (headers only) tells a lane that nothing of it happened up to a position, so that its
projectors' tracking reaches the ledger head while the other lane is busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import msgspec
import nats
from eventsourcing.utils import get_topic
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from domain.usage import Usage

LEDGER_RETENTION_S = 7 * 24 * 3600
DLQ_RETENTION_S = 90 * 24 * 3600
DUPLICATE_WINDOW_S = 600
MAX_MESSAGE_BYTES = 900_000  # below nats-server's default 1 MiB max_payload
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5
MAX_PENDING_BYTES = 8 * 1024 * 1024
PREV_HEADER = "Ledger-Prev"  # position before the message's first entry
TOPIC_HEADER = "Ledger-Topic"  # the one topic of every entry in the message
LANE_PREV_HEADER = "Ledger-Lane-Prev"  # last position of the lane's previous message
LANE_HEADER = "Ledger-Lane"  # on a watermark: the lane it speaks for
LAST_HEADER = "Ledger-Last"  # on a watermark: the lane has nothing more up to this position
WATERMARK = "ledger:Watermark"  # the topic header of a watermark (no entries, headers only)
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
    """Stream and subject names; a prefix isolates tests sharing one server."""

    prefix: str = ""

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
    return await nats.connect(
        url,
        name=name,
        connect_timeout=CONNECT_TIMEOUT_S,
        reconnect_time_wait=RECONNECT_WAIT_S,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        pending_size=MAX_PENDING_BYTES,
    )


async def ensure_streams(js: JetStreamContext, streams: Streams) -> None:
    """Create or update both streams; safe to call from every process at start."""
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
        ),
        StreamConfig(
            name=streams.dlq,
            subjects=[streams.dlq_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=DLQ_RETENTION_S,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
    ]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
