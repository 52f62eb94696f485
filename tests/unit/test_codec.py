"""The msgspec mapper keeps Decimal, UUID and aware datetimes exact, and relays group sanely."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import msgspec
from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from hypothesis import given
from hypothesis import strategies as st

from adapters.bus import (
    DOMAIN_LANE,
    MAX_MESSAGE_BYTES,
    USAGE_LANE,
    Entry,
    RelayedBatch,
    decode_batch,
    encode,
    entries_decoder,
    lane_of,
)
from adapters.codec import MsgspecMapper, decode_view, encode_state, encode_states
from adapters.relay import ENTRIES_PER_MESSAGE_MAX, group_messages
from domain.usage import Usage


class Sample(Aggregate):
    class Created(Aggregate.Created):
        amount: Decimal
        ref: UUID
        at: datetime
        tags: dict[str, str]
        note: str | None

    class Versioned(Aggregate.Event):
        class_version = 2
        amount: Decimal
        currency: str = "INR"

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["currency"] = "INR"

    def __init__(self, amount: Decimal, ref: UUID, at: datetime, tags: dict[str, str],
                 note: str | None) -> None:
        self.amount = amount


decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: len(d.as_tuple().digits) <= 28
)
aware = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))


@given(amount=decimals, at=aware, note=st.none() | st.text(max_size=20),
       tags=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_round_trip_is_exact(amount: Decimal, at: datetime, note: str | None,
                             tags: dict[str, str]) -> None:
    mapper = MsgspecMapper()
    ref = uuid4()
    agg = Sample._create(Sample.Created, id=uuid4(), amount=amount, ref=ref, at=at, tags=tags,
                         note=note)
    (event,) = agg.collect_events()
    back = mapper.to_domain_event(mapper.to_stored_event(event))
    assert back == event
    assert str(back.amount) == str(amount)  # same digits and exponent, not merely equal
    assert back.at == at and back.at.utcoffset() is not None
    assert isinstance(back.ref, UUID) and back.ref == ref


def test_old_class_versions_are_upcast() -> None:
    mapper = MsgspecMapper()
    agg = Sample._create(Sample.Created, id=uuid4(), amount=Decimal("1"), ref=uuid4(),
                         at=datetime.now(UTC), tags={}, note=None)
    agg.trigger_event(Sample.Versioned, amount=Decimal("2.5"))
    stored = mapper.to_stored_event(agg.collect_events()[-1])
    # A row written before the class had `currency` and a class_version.
    from adapters.codec import _ENCODER, decode_state

    state = decode_state(Sample.Versioned, stored.state)
    state.pop("class_version", None)
    state.pop("currency")
    old = stored.__class__(stored.originator_id, stored.originator_version, stored.topic,
                           _ENCODER.encode(state))
    back = mapper.to_domain_event(old)
    assert back.currency == "INR" and back.amount == Decimal("2.5")
    # A reader's narrow view of the same old row is upcast too.
    view = decode_view(Sample.Versioned, AmountView, old.state)
    assert (view.amount, view.currency) == (Decimal("2.5"), "INR")


class AmountView(msgspec.Struct):
    amount: Decimal
    currency: str


class SampleView(msgspec.Struct):
    amount: Decimal
    at: datetime
    tags: dict[str, str]


@given(amount=decimals, at=aware,
       tags=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_a_view_decodes_the_same_values_as_the_whole_event(
    amount: Decimal, at: datetime, tags: dict[str, str]
) -> None:
    mapper = MsgspecMapper()
    agg = Sample._create(Sample.Created, id=uuid4(), amount=amount, ref=uuid4(), at=at,
                         tags=tags, note="n")
    (event,) = agg.collect_events()
    assert isinstance(event, Sample.Created)
    stored = mapper.to_stored_event(event)
    view = decode_view(Sample.Created, SampleView, stored.state)
    assert (view.amount, view.at, view.tags) == (event.amount, event.at, event.tags)
    assert str(view.amount) == str(amount)


def entry_bytes(position: int, ident: UUID, version: int, state: bytes) -> bytes:
    """What bus.ENTRY_SQL makes Postgres write for a row (the pipeline tests run the real one)."""
    return (b"\x94\xd3" + position.to_bytes(8, "big") + b"\xc4\x10" + ident.bytes + b"\xd3"
            + version.to_bytes(8, "big") + state)


def _rows(topics: list[str], state: bytes = b"\xc0") -> list[tuple[int, str, bytes]]:
    return [(i + 10, t, entry_bytes(i + 10, uuid4(), 1, state)) for i, t in enumerate(topics)]


def test_relay_groups_runs_of_one_topic_and_chains_prev_positions() -> None:
    rows = _rows(["a", "a", "b", "a"])
    messages, _ = group_messages(rows, 7, {})
    assert [(m.topic, m.first, m.last) for m in messages] == [("a", 10, 11), ("b", 12, 12), ("a", 13, 13)]
    assert [m.prev for m in messages] == [7, 11, 12]
    assert [m.count for m in messages] == [2, 1, 1]


def test_a_relayed_body_decodes_to_its_entries_with_their_states_as_stored() -> None:
    mapper = MsgspecMapper()
    agg = Sample._create(Sample.Created, id=uuid4(), amount=Decimal("1.5"), ref=uuid4(),
                         at=datetime(2026, 10, 1, tzinfo=UTC), tags={"a": "b"}, note=None)
    (event,) = agg.collect_events()
    stored = mapper.to_stored_event(event)
    assert isinstance(stored.originator_id, UUID)
    rows = [(p, stored.topic, entry_bytes(p, stored.originator_id, 1, stored.state)) for p in (3, 9)]
    (message,), _ = group_messages(rows, 2, {})
    entries = entries_decoder(None).decode(message.body)
    assert [(e.position, e.originator_id, e.originator_version, bytes(e.state)) for e in entries] == [
        (3, stored.originator_id, 1, stored.state), (9, stored.originator_id, 1, stored.state)]
    assert mapper.to_domain_event(entries[0].stored(stored.topic)) == event
    viewed = entries_decoder(SampleView).decode(message.body)
    assert [(e.position, e.state) for e in viewed] == [
        (p, SampleView(Decimal("1.5"), datetime(2026, 10, 1, tzinfo=UTC), {"a": "b"})) for p in (3, 9)]


def test_a_format_1_message_still_decodes() -> None:
    entries = [Entry(position=5, originator_id=uuid4(), originator_version=1, topic="t", state=b"x")]
    batch = RelayedBatch(prev=4, entries=entries)
    assert decode_batch(encode(batch)) == batch


def test_relay_messages_are_bounded_in_entries() -> None:
    rows = _rows(["a"] * (ENTRIES_PER_MESSAGE_MAX + 5))
    messages, _ = group_messages(rows, 0, {})
    assert [m.count for m in messages] == [ENTRIES_PER_MESSAGE_MAX, 5]
    assert messages[1].prev == messages[0].last


def test_relay_messages_are_bounded_in_bytes_and_a_huge_entry_goes_alone() -> None:
    third = msgspec.msgpack.encode(b"x" * (MAX_MESSAGE_BYTES // 3))
    huge = msgspec.msgpack.encode(b"y" * MAX_MESSAGE_BYTES)
    rows = [(p, "a", entry_bytes(p, uuid4(), 1, huge if p == 14 else third)) for p in range(10, 15)]
    messages, _ = group_messages(rows, 0, {})
    assert [[e.position for e in entries_decoder(None).decode(m.body)] for m in messages] == [
        [10, 11], [12, 13], [14]]
    assert all(len(m.body) <= MAX_MESSAGE_BYTES for m in messages[:2])


def test_each_relay_message_names_the_last_position_of_its_lane_before_it() -> None:
    usage, other = get_topic(Usage.Recorded), "domain.meter:Meter.Defined"
    rows = _rows([usage, usage, other, usage, other])  # positions 10..14
    messages, lanes = group_messages(rows, 9, {USAGE_LANE: 5, DOMAIN_LANE: 8})
    assert [(m.first, m.last) for m in messages] == [(10, 11), (12, 12), (13, 13), (14, 14)]
    assert [m.prev for m in messages] == [9, 11, 12, 13]
    assert [m.lane_prev for m in messages] == [5, 8, 11, 12]
    assert lanes == {USAGE_LANE: 13, DOMAIN_LANE: 14}
    assert {lane_of(usage), lane_of(other)} == {USAGE_LANE, DOMAIN_LANE}


@given(st.lists(st.tuples(st.text(max_size=20), st.decimals(allow_nan=False, allow_infinity=False),
                          st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
                min_size=1, max_size=20))
def test_states_encoded_together_equal_each_encoded_alone(
    rows: list[tuple[str, Decimal, dict[str, str]]]
) -> None:
    common = {"timestamp": datetime(2026, 12, 1, tzinfo=UTC), "originator_topic": "t",
              "organisation_id": uuid4(), "project_id": uuid4(), "timezone": "Asia/Kolkata"}
    columns: dict[str, list[Any]] = {"event_id": [r[0] for r in rows], "metric": ["m"] * len(rows),
               "value": [r[1] for r in rows], "occurred_at": [common["timestamp"]] * len(rows),
               "properties": [r[2] for r in rows]}
    together = encode_states(Usage.Recorded, common, columns)
    alone = [encode_state(Usage.Recorded, common | {k: v[i] for k, v in columns.items()})
             for i in range(len(rows))]
    assert together == alone
