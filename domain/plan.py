"""The Plan aggregate: one per plan code, holding every published version of that plan.

A plan version is immutable once published. Publishing a plan whose code already exists makes
the next version (1, 2, ...); nothing is ever edited in place, so an invoice can always be
re-priced with the exact version that priced it. Each event carries the full version, in a
ledger format of its own (`ChargeSpec`, `TierSpec`) that is deliberately separate from the
pricing engine's value types: `to_version` turns a stored version into a
`domain.pricing.PlanVersion`. The rules are written down in docs/PLANS.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from decimal import Decimal
from typing import Any, cast
from uuid import UUID, uuid5

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import FieldError, Problems, ValidationFailed
from domain.pricing import PLAN_CODE_MAX_CHARS, Charge, ChargeModel, PlanVersion, Tier, validate_plan

FIRST_VERSION = 1
# Plan codes appear in URLs (GET /admin/v1/plans/{code}): the same alphabet as meter codes.
_CODE = re.compile(rf"^[a-z][a-z0-9_.-]{{0,{PLAN_CODE_MAX_CHARS - 1}}}$")
_PLAN_NAMESPACE = UUID("9a7d3c52-1f0e-4b8a-b0c4-5d2e8f6a0b11")

ZERO = Decimal(0)


def plan_id(code: str) -> UUID:
    """One plan per code: its ledger identity is derived from the code."""
    return uuid5(_PLAN_NAMESPACE, code)


# Ledger formats: they evolve by adding fields with defaults, and they do not forbid unknown
# fields, so a replica on the previous release can still read what a newer one recorded.
class TierSpec(msgspec.Struct, frozen=True):
    """A tier as recorded in the ledger. `up_to` is inclusive (None: open-ended); rupees."""

    up_to: Decimal | None
    unit_price: Decimal
    flat_fee: Decimal = ZERO


class ChargeSpec(msgspec.Struct, frozen=True):
    """A charge as recorded in the ledger; only the fields of its `model` are set (rupees)."""

    metric: str
    model: str
    unit_price: Decimal | None = None
    tiers: tuple[TierSpec, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal | None = None


class StoredVersion(msgspec.Struct, frozen=True):
    """One published plan version as the ledger (and the plans read model) knows it."""

    code: str
    version: int
    name: str
    currency: str
    base_fee: Decimal
    minimum: Decimal
    charges: tuple[ChargeSpec, ...]
    published_at: datetime


def to_charge(spec: ChargeSpec) -> Charge:
    """The pricing engine's Charge for a recorded charge (validate_plan checks `model`)."""
    return Charge(
        metric=spec.metric,
        model=cast(ChargeModel, spec.model),
        unit_price=spec.unit_price,
        tiers=tuple(Tier(t.up_to, t.unit_price, t.flat_fee) for t in spec.tiers),
        package_size=spec.package_size,
        package_price=spec.package_price,
    )


def to_version(stored: StoredVersion) -> PlanVersion:
    """The pricing engine's PlanVersion for a stored version."""
    return _pricing_version(stored.code, stored.version, stored.name, stored.currency,
                            stored.base_fee, stored.minimum, stored.charges)


def _pricing_version(
    code: str, version: int, name: str, currency: str, base_fee: Decimal, minimum: Decimal,
    charges: Sequence[ChargeSpec],
) -> PlanVersion:
    return PlanVersion(code=code, version=version, name=name, currency=currency,
                       base_fee=base_fee, minimum=minimum,
                       charges=tuple(to_charge(c) for c in charges))


def check_version(candidate: PlanVersion, known_meters: AbstractSet[str]) -> None:
    """Raise ValidationFailed naming every rule the candidate version breaks: the pricing
    engine's rules (validate_plan) plus the plan code's alphabet."""
    Problems(_version_problems(candidate, known_meters)).raise_if_any()


def _version_problems(candidate: PlanVersion, known_meters: AbstractSet[str]) -> list[FieldError]:
    problems = Problems()
    try:
        validate_plan(candidate, known_meters)
    except ValidationFailed as failed:
        problems.errors.extend(failed.errors)
    code_reported = any(e.field == "code" for e in problems.errors)
    if not code_reported and not _CODE.match(candidate.code):
        problems.add("code", f"1-{PLAN_CODE_MAX_CHARS} characters: lower-case letters, digits, _ . - ;"
                             " starting with a letter")
    return problems.errors


def publication_problems(
    *, code: str, name: str, currency: str, base_fee: Decimal, minimum: Decimal,
    charges: Sequence[ChargeSpec], known_meters: AbstractSet[str], latest: StoredVersion | None,
) -> list[FieldError]:
    """Every rule that publishing this version would break (none: it may be published), after
    `latest`, the plan's latest version (None for a new code). Checks without deciding: the API
    reports these beside the fields it could not read, so that one 422 names every problem."""
    version = FIRST_VERSION if latest is None else latest.version + 1
    errors = _version_problems(
        _pricing_version(code, version, name, currency, base_fee, minimum, charges), known_meters)
    if latest is not None and currency != latest.currency and not any(
            e.field == "currency" for e in errors):
        errors.append(FieldError("currency", f"plan {code!r} is priced in {latest.currency};"
                                             " a new version cannot change its currency"))
    return errors


class Plan(Aggregate):
    """Every version of one plan code, oldest first."""

    class Published(Aggregate.Created):
        """The first version of a plan."""

        code: str
        version: int
        name: str
        currency: str
        base_fee: Decimal
        minimum: Decimal
        charges: tuple[ChargeSpec, ...]

        def apply(self, aggregate: Any) -> None:
            aggregate.versions.append(_stored(self))

    class VersionPublished(Aggregate.Event):
        """A later version of the plan (version = previous + 1)."""

        code: str
        version: int
        name: str
        currency: str
        base_fee: Decimal
        minimum: Decimal
        charges: tuple[ChargeSpec, ...]

        def apply(self, aggregate: Any) -> None:
            aggregate.versions.append(_stored(self))

    def __init__(self, code: str) -> None:
        self.code = code
        self.versions: list[StoredVersion] = []

    @property
    def latest(self) -> StoredVersion:
        return self.versions[-1]

    @classmethod
    def publish(
        cls, code: str, name: str, currency: str, base_fee: Decimal, minimum: Decimal,
        charges: Sequence[ChargeSpec], known_meters: AbstractSet[str], at: datetime,
    ) -> Plan:
        """Decide: validate version 1 of a new plan and emit Published."""
        check_version(_pricing_version(code, FIRST_VERSION, name, currency, base_fee, minimum, charges),
                      known_meters)
        return cls._create(cls.Published, id=plan_id(code), timestamp=at, code=code,
                           version=FIRST_VERSION, name=name, currency=currency, base_fee=base_fee,
                           minimum=minimum, charges=tuple(charges))

    def publish_version(
        self, name: str, currency: str, base_fee: Decimal, minimum: Decimal,
        charges: Sequence[ChargeSpec], known_meters: AbstractSet[str], at: datetime,
    ) -> StoredVersion:
        """Decide: validate the next version and emit VersionPublished; returns it.

        The currency is fixed by the first version: an organisation's invoices never change
        currency because its plan published a new version."""
        Problems(publication_problems(
            code=self.code, name=name, currency=currency, base_fee=base_fee, minimum=minimum,
            charges=charges, known_meters=known_meters, latest=self.latest)).raise_if_any()
        version = self.latest.version + 1
        self.trigger_event(self.VersionPublished, timestamp=at, code=self.code, version=version,
                           name=name, currency=currency, base_fee=base_fee, minimum=minimum,
                           charges=tuple(charges))
        return self.latest

    def version_at(self, instant: datetime) -> StoredVersion:
        """The latest version published at or before `instant` (the first one if none was)."""
        return self.versions[pinned_version(
            [(v.version, v.published_at) for v in self.versions], instant) - 1]


def pinned_version(published: Sequence[tuple[int, datetime]], instant: datetime) -> int:
    """Of (version, published_at) pairs, the latest version published at or before `instant`;
    the earliest version when none was published by then (a subscription dated before its
    plan existed is priced by the plan's first version)."""
    if not published:
        raise ValueError("a plan has at least one version")
    in_force = [version for version, at in published if at <= instant]
    return max(in_force) if in_force else min(version for version, _ in published)


def _stored(e: Plan.Published | Plan.VersionPublished) -> StoredVersion:
    return StoredVersion(code=e.code, version=e.version, name=e.name, currency=e.currency,
                         base_fee=e.base_fee, minimum=e.minimum, charges=tuple(e.charges),
                         published_at=e.timestamp)
