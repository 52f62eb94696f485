"""The Meter aggregate: a platform-wide definition of how usage of one metric is aggregated."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, Problems

AGGREGATIONS = ("count", "sum", "max", "unique_count", "latest")
CODE_MAX_CHARS = 64
NAME_MAX_CHARS = 200
GROUP_BY_MAX_KEYS = 4
PROPERTY_NAME_MAX_CHARS = 64
_CODE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_PROPERTY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_METER_NAMESPACE = UUID("6f1c1bd2-4c2a-4f39-9d55-3c1b0cf0a001")


def meter_id(code: str) -> UUID:
    """One meter per code: its ledger identity is derived from the code."""
    return uuid5(_METER_NAMESPACE, code)


def check_definition(
    code: str, name: str, aggregation: str, field: str | None, group_by: list[str],
    allow_negative: bool, kept_count_field: bool = False,
) -> None:
    """Every rule of a meter's definition (docs/METERING.md). `kept_count_field`: the meter is
    a count meter that already has this field, defined before a count meter was refused one."""
    problems = Problems()
    if not _CODE.match(code):
        problems.add("code", "1-64 characters: lower-case letters, digits, _ . - ; starting with a letter")
    if not name.strip() or len(name) > NAME_MAX_CHARS:
        problems.add("name", f"1-{NAME_MAX_CHARS} characters")
    if aggregation not in AGGREGATIONS:
        problems.add("aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    if aggregation == "unique_count" and not field:
        problems.add("field", "unique_count needs the property whose distinct values it counts")
    if aggregation == "count" and field is not None and not kept_count_field:
        # A count meter counts events: a field it would never read is a mistake (say, a max or
        # sum meter was meant), refused rather than silently ignored.
        problems.add("field", "a count meter counts events and reads no property; with a field,"
                     " use sum, max or latest (the property is the value) or unique_count")
    if field is not None and not _PROPERTY.match(field):
        problems.add("field", "a property name: 1-64 letters, digits, _ . -")
    if len(group_by) > GROUP_BY_MAX_KEYS:
        problems.add("group_by", f"at most {GROUP_BY_MAX_KEYS} properties")
    if len(set(group_by)) != len(group_by) or not all(_PROPERTY.match(g) for g in group_by):
        problems.add("group_by", "distinct property names: 1-64 letters, digits, _ . -")
    if allow_negative and aggregation != "sum":
        problems.add("allow_negative", "only sum meters accept negative corrections")
    problems.raise_if_any()


class Meter(Aggregate):
    class Defined(Aggregate.Created):
        code: str
        name: str
        aggregation: str
        field: str | None
        group_by: list[str]
        allow_negative: bool

    class Redefined(Aggregate.Event):
        name: str
        aggregation: str
        field: str | None
        group_by: list[str]
        allow_negative: bool

        def apply(self, aggregate: Any) -> None:
            aggregate.name = self.name
            aggregate.aggregation = self.aggregation
            aggregate.field = self.field
            aggregate.group_by = list(self.group_by)
            aggregate.allow_negative = self.allow_negative

    def __init__(self, code: str, name: str, aggregation: str, field: str | None,
                 group_by: list[str], allow_negative: bool) -> None:
        self.code = code
        self.name = name
        self.aggregation = aggregation
        self.field = field
        self.group_by = list(group_by)
        self.allow_negative = allow_negative

    @classmethod
    def define(cls, code: str, name: str, aggregation: str, field: str | None,
               group_by: list[str], allow_negative: bool, at: datetime) -> Meter:
        check_definition(code, name, aggregation, field, group_by, allow_negative)
        return cls._create(cls.Defined, id=meter_id(code), timestamp=at, code=code, name=name,
                           aggregation=aggregation, field=field, group_by=list(group_by),
                           allow_negative=allow_negative)

    def redefine(self, name: str, aggregation: str, field: str | None, group_by: list[str],
                 allow_negative: bool, has_usage: bool, at: datetime) -> bool:
        """Change the definition; how usage is aggregated is frozen once usage exists."""
        kept = aggregation == self.aggregation == "count" and field == self.field
        check_definition(self.code, name, aggregation, field, group_by, allow_negative, kept)
        new = (name, aggregation, field, list(group_by), allow_negative)
        if new == (self.name, self.aggregation, self.field, self.group_by, self.allow_negative):
            return False
        if has_usage and (aggregation, field, list(group_by)) != (
            self.aggregation, self.field, self.group_by
        ):
            raise Conflict(
                f"meter {self.code!r} already has usage: its aggregation, field and group_by "
                "cannot change (define a new meter code instead)"
            )
        self.trigger_event(self.Redefined, timestamp=at, name=name, aggregation=aggregation,
                           field=field, group_by=list(group_by), allow_negative=allow_negative)
        return True
