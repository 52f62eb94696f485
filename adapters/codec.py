"""Encodes domain events for the ledger with msgspec msgpack, typed per event class.

A typed decoder per class keeps Decimal, UUID and aware datetimes exact (datetimes come back
in UTC, the same instant), and is faster and smaller than the library's JSON transcoding.
Schemas evolve by adding fields with defaults, so old rows decode with the current class;
`class_version` upcasters still run on the decoded state.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import repeat
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic, resolve_topic

_HEADER_FIELDS = frozenset({"originator_id", "originator_version"})
_ENCODER = msgspec.msgpack.Encoder(uuid_format="bytes")
V = TypeVar("V", bound=msgspec.Struct)


@lru_cache(maxsize=512)
def _codec_for(event_cls: type) -> tuple[type[msgspec.Struct], msgspec.msgpack.Decoder[Any]]:
    hints = typing.get_type_hints(event_cls)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in dataclasses.fields(event_cls):
        if f.name in _HEADER_FIELDS:
            continue
        kind = hints.get(f.name, Any)
        if f.default is not dataclasses.MISSING:
            fields.append((f.name, kind, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind))
    fields.append(("class_version", int, 1))
    # Required fields must precede defaulted ones in a Struct definition.
    fields.sort(key=lambda spec: len(spec) == 3)
    # gc=False: a state struct lives only to be encoded (a thousand per batch) or read into a
    # dict; it never takes part in a reference cycle, so the collector need not track it.
    struct = msgspec.defstruct(f"{event_cls.__qualname__}State", fields, omit_defaults=True,
                               gc=False)
    return struct, msgspec.msgpack.Decoder(struct)


def encode_state(event_cls: type, state: dict[str, Any]) -> bytes:
    struct, _ = _codec_for(event_cls)
    return _ENCODER.encode(struct(**state))


def encode_states(
    event_cls: type, common: Mapping[str, Any], columns: Mapping[str, Sequence[Any]]
) -> list[bytes]:
    """Many events of one class, each equal to `encode_state` of it: `common` holds the fields
    every event shares, `columns` one value per event of the others. No Python frame runs per
    event (the hot path of ingestion), and the shared fields are encoded once (msgspec.Raw is
    written as is): 1.17-1.24 -> 1.01-1.02 us an event for usage. Fields given by neither must
    have defaults and come last."""
    struct, _ = _codec_for(event_cls)
    count = len(next(iter(columns.values())))
    args: list[Any] = []
    for name in struct.__struct_fields__:
        if name in columns:
            assert len(columns[name]) == count, name
            args.append(columns[name])
        elif name in common:
            args.append(repeat(msgspec.Raw(_ENCODER.encode(common[name])), count))
        else:
            break
    assert len(args) == len(common) + len(columns), "only trailing defaulted fields may be left out"
    return list(map(_ENCODER.encode, map(struct, *args)))


def decode_state(event_cls: type, data: bytes) -> dict[str, Any]:
    _, decoder = _codec_for(event_cls)
    return msgspec.structs.asdict(decoder.decode(data))


@lru_cache(maxsize=64)
def _view_decoder(view_cls: type) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(view_cls)


def decode_view(event_cls: type, view_cls: type[V], data: bytes) -> V:
    """Only the fields a reader needs (a msgspec Struct naming a subset of the event's fields),
    decoded straight from the stored state: a third of the cost of the whole event. An event
    class with upcasters is decoded whole, upcast, narrowed, and decoded again as the view, so
    that its fields have the view's own types either way (16 bytes for a UUID, say)."""
    if getattr(event_cls, "class_version", 1) == 1:
        view: V = _view_decoder(view_cls).decode(data)
        return view
    state = decode_state(event_cls, data)
    from_version = state.pop("class_version", 1)
    _upcast(event_cls, state, from_version)
    narrowed = {name: state[name] for name in view_cls.__struct_fields__}
    upcast: V = _view_decoder(view_cls).decode(_ENCODER.encode(narrowed))
    return upcast


def _upcast(event_cls: type[Any], state: dict[str, Any], from_version: int) -> None:
    target_version = getattr(event_cls, "class_version", 1)
    while from_version < target_version:
        getattr(event_cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
        from_version += 1


class MsgspecMapper(Mapper[UUID]):
    """A Mapper whose state encoding is msgspec msgpack, typed by the event's own class."""

    def __init__(self, transcoder: Transcoder | None = None, **_: Any) -> None:
        # The library's Transcoder is unused: encoding is typed per event class below.
        self.transcoder = transcoder  # type: ignore[assignment]
        self.compressor = None
        self.cipher = None

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        cls = type(domain_event)
        state = dict(vars(domain_event))
        originator_id = state.pop("originator_id")
        originator_version = state.pop("originator_version")
        class_version = getattr(cls, "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=get_topic(cls),
            state=encode_state(cls, state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        cls = resolve_topic(stored_event.topic)
        state = decode_state(cls, stored_event.state)
        _upcast(cls, state, state.pop("class_version", 1))
        originator_id = stored_event.originator_id
        state["originator_id"] = (
            originator_id if isinstance(originator_id, UUID) else UUID(str(originator_id))
        )
        state["originator_version"] = stored_event.originator_version
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return event
