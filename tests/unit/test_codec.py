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

from adapters.bus import DOMAIN_LANE, USAGE_LANE, Entry, RelayedBatch, decode_batch, encode, lane_of
from adapters.codec import MsgspecMapper, decode_view
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
    stored = mapper.to_stored_event(event)
    view = decode_view(Sample.Created, SampleView, stored.state)
    assert (view.amount, view.at, view.tags) == (event.amount, event.at, event.tags)
    assert str(view.amount) == str(amount)


def _notes(topics: list[str]) -> list[Entry]:
    return [Entry(position=i + 10, originator_id=uuid4(), originator_version=1, topic=t,
                  state=b"x") for i, t in enumerate(topics)]


def test_relay_groups_runs_of_one_topic_and_chains_prev_positions() -> None:
    notes = _notes(["a", "a", "b", "a"])
    batches, _ = group_messages(notes, 7, {})
    assert [[e.position for e in b.entries] for b in batches] == [[10, 11], [12], [13]]
    assert [b.prev for b in batches] == [7, 11, 12]
    decoded = decode_batch(encode(batches[0]))
    assert isinstance(decoded, RelayedBatch) and decoded == batches[0]


def test_relay_messages_are_bounded_in_entries() -> None:
    notes = _notes(["a"] * (ENTRIES_PER_MESSAGE_MAX + 5))
    batches, _ = group_messages(notes, 0, {})
    assert [len(b.entries) for b in batches] == [ENTRIES_PER_MESSAGE_MAX, 5]
    assert batches[1].prev == batches[0].last


def test_each_relay_message_names_the_last_position_of_its_lane_before_it() -> None:
    usage, other = get_topic(Usage.Recorded), "domain.meter:Meter.Defined"
    notes = _notes([usage, usage, other, usage, other])  # positions 10..14
    batches, lanes = group_messages(notes, 9, {USAGE_LANE: 5, DOMAIN_LANE: 8})
    assert [(b.first, b.last) for b in batches] == [(10, 11), (12, 12), (13, 13), (14, 14)]
    assert [b.prev for b in batches] == [9, 11, 12, 13]
    assert [b.lane_prev for b in batches] == [5, 8, 11, 12]
    assert lanes == {USAGE_LANE: 13, DOMAIN_LANE: 14}
    assert {lane_of(usage), lane_of(other)} == {USAGE_LANE, DOMAIN_LANE}
