"""The one credential check that API keys and admin tokens share (api/credentials.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from api.credentials import Presented, verify
from api.problems import Unauthenticated

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Record:
    digest: str
    revoked: bool = False
    expires_at: datetime | None = None


@dataclass
class Lookup:
    records: dict[str, Record]
    refusals: list[tuple[str, str]] = field(default_factory=list)

    async def find(self, prefix: str) -> Record | None:
        return self.records.get(prefix)

    async def confirm_refusal(self, prefix: str, attempt: str) -> None:
        self.refusals.append((prefix, attempt))


def check(lookup: Lookup, presented: Presented | None) -> Record | None:
    return asyncio.run(verify(lookup, presented, digest_of=lambda r: r.digest, noun="thing",
                              clock=lambda: NOW))


def test_the_matching_digest_gives_the_record() -> None:
    lookup = Lookup({"p": Record("d")})
    assert check(lookup, Presented("p", "d")) == Record("d")
    assert lookup.refusals == []


def test_an_unknown_prefix_or_a_malformed_credential_names_nothing() -> None:
    lookup = Lookup({"p": Record("d")})
    assert check(lookup, Presented("q", "d")) is None
    assert check(lookup, None) is None
    assert lookup.refusals == []  # the lookup itself was the cost


def test_a_wrong_secret_for_a_known_prefix_pays_the_unknown_prefix_cost() -> None:
    lookup = Lookup({"p": Record("d")})
    assert check(lookup, Presented("p", "other")) is None
    assert lookup.refusals == [("p", "other")]


@pytest.mark.parametrize(("record", "said"), [
    (Record("d", revoked=True), "this thing has been revoked"),
    (Record("d", expires_at=NOW), "this thing has expired"),
])
def test_a_lapsed_credential_is_refused_by_its_name(record: Record, said: str) -> None:
    with pytest.raises(Unauthenticated, match=said):
        check(Lookup({"p": record}), Presented("p", "d"))


def test_a_credential_expiring_later_is_live() -> None:
    record = Record("d", expires_at=NOW + timedelta(seconds=1))
    assert check(Lookup({"p": record}), Presented("p", "d")) is record
