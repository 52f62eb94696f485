"""How a projector reads a relayed message (adapters/bus.py): its headers say where it lies in
the ledger, its body holds the entries. `MessageReader.read` turns a message into a `Delivery`
for one read model: the entries decoded (straight into the model's views where it has them), or
only the positions of a topic the model ignores, without decoding the body.

A message that cannot be read changes nothing the ledger cannot mend: with its Nats-Msg-Id
range, that range is read from the ledger instead; without it, the chain of `prev` positions
makes the next message fill the gap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from adapters.bus import (
    ENTRIES_FORMAT,
    FORMAT_HEADER,
    LANE_HEADER,
    LANE_PREV_HEADER,
    LAST_HEADER,
    PREV_HEADER,
    TOPIC_HEADER,
    WATERMARK,
    decode_batch,
    entries_decoder,
    lane_of,
)

log = logging.getLogger("billing.projector")


@dataclass(frozen=True)
class Delivery:
    """What one message brings a projector: `prev`, the chain position everything before it
    ends at; the range of positions it covers; and its entries, ready to apply. No entries: a
    topic the model ignores, a watermark, or a body that would not decode (then `prev` is `last`,
    so the whole range is read from the ledger)."""

    prev: int
    first: int
    last: int
    entries: Sequence[Any] = ()  # each has `position` and `state`
    topic: str = ""  # of every entry; "" when each entry names its own (format 1)
    views: bool = False  # each entry's state is already the model's view of it


@dataclass(frozen=True)
class MessageReader:
    """Reads messages for one read model: the topics it handles, the one lane it consumes
    (None: all of them) and, per topic, the view its entries decode straight into."""

    model: str
    topics: frozenset[str]
    lane: str | None
    direct_views: dict[str, type]

    def read(self, msg: Msg) -> Delivery:
        try:
            return self._read(msg)
        except (ValueError, KeyError) as e:  # msgspec.DecodeError is a ValueError
            log.error("projector %s cannot decode message (%s: %s): its range will be read from"
                      " the ledger", self.model, type(e).__name__, e)
        with contextlib.suppress(ValueError, KeyError, AttributeError):
            first, _, last = (msg.headers or {})["Nats-Msg-Id"].partition("-")
            return Delivery(int(last), int(first), int(last))  # prev = last: all from the ledger
        return Delivery(0, 0, 0)

    def _read(self, msg: Msg) -> Delivery:
        headers = msg.headers or {}
        topic = headers.get(TOPIC_HEADER)
        if topic == WATERMARK:
            if self.lane is None or headers.get(LANE_HEADER) != self.lane:
                return Delivery(0, 0, 0)  # not for this model: changes nothing
            head = int(headers[LAST_HEADER])
            return Delivery(int(headers[LANE_PREV_HEADER]), head, head)
        prev = headers.get(PREV_HEADER)
        if self.lane is not None and topic is not None and lane_of(topic) == self.lane:
            # Chained within the lane. Without the header (an older relay), or for a message of
            # another lane, the global prev: it can only make the projector fill from the
            # ledger, never skip.
            prev = headers.get(LANE_PREV_HEADER, prev)
        if topic is not None and prev is not None:
            first, _, last = headers["Nats-Msg-Id"].partition("-")
            if topic not in self.topics:
                return Delivery(int(prev), int(first), int(last))
            if headers.get(FORMAT_HEADER) == ENTRIES_FORMAT:
                view = self.direct_views.get(topic)
                entries = entries_decoder(view).decode(msg.data)
                return Delivery(int(prev), int(first), int(last), entries, topic, view is not None)
        batch = decode_batch(msg.data)  # format 1
        return Delivery(batch.prev if prev is None else int(prev), batch.first, batch.last,
                        batch.entries)
