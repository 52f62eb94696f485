"""The Ledger port's contract (domain.ports.Ledger), as one abstract suite.

As eventsourcing's own tests/persistence.py does for its recorders: `LedgerContract` holds the
test methods and an abstract factory, `open_ledger`; a small concrete class per implementation
runs them (tests/unit/test_memory_ledger.py: the in-memory fake; tests/integration/
test_ledger_store.py: LedgerStore on Postgres). A fake that passes it cannot let a unit test pass
that the real ledger would fail. The class name does not start with "Test", so pytest collects
it only through its concrete subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import ClassVar
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import pytest
from eventsourcing.domain import Aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import Conflict, NotFound
from domain.organisation import Organisation, OrganisationSettings
from domain.plan import ChargeSpec, Plan, TierSpec
from domain.ports import Ledger
from domain.project import Project

AT = datetime(2026, 9, 10, 9, 0, tzinfo=UTC)
IST = ZoneInfo("Asia/Kolkata")  # a zone with an offset, to see what comes back
METERS = frozenset({"api_calls", "storage_gb"})
INTERLEAVED_STEPS_MAX = 12


class LedgerContract(ABC):
    """What every Ledger does; subclasses say how to open one (empty, of their own)."""

    # Examples of the interleaving property; a subclass on a server runs fewer.
    PROPERTY_EXAMPLES: ClassVar[int] = 100

    @abstractmethod
    def open_ledger(self, request: pytest.FixtureRequest) -> AbstractContextManager[Ledger]:
        """An empty ledger of this implementation, closed (and dropped) when the block ends."""

    @pytest.fixture
    def ledger(self, request: pytest.FixtureRequest) -> Iterator[Ledger]:
        with self.open_ledger(request) as ledger:
            yield ledger

    def save(self, ledger: Ledger, *aggregates: Aggregate) -> int:
        """Every save of the suite goes through here: the one place to pass what the port's
        save requires besides the aggregates. No actor: the contract is about the entries, and
        audit entries are LedgerStore's alone (the in-memory ledger records none)."""
        return ledger.save(*aggregates, actor=None)

    # ---- reading ------------------------------------------------------------------------------

    def test_get_of_an_unknown_id_raises_not_found(self, ledger: Ledger) -> None:
        unknown = uuid4()
        with pytest.raises(NotFound) as info:
            ledger.get(unknown, Organisation)
        assert (info.value.kind, info.value.ident) == ("Organisation", unknown)

    def test_get_returns_the_aggregate_at_its_newest_version(self, ledger: Ledger) -> None:
        org = organisation()
        self.save(ledger, org)
        copy = ledger.get(org.id, Organisation)
        assert copy.update_settings(OrganisationSettings(name="Acme Two"), AT + timedelta(hours=1))
        assert copy.set_suspended(True, "unpaid", AT + timedelta(hours=2))
        self.save(ledger, copy)
        got = ledger.get(org.id, Organisation)
        assert type(got) is Organisation
        assert (got.id, got.version, got.name, got.suspended) == (org.id, 3, "Acme Two", True)
        assert got.modified_on == AT + timedelta(hours=2)

    def test_get_gives_a_fresh_copy_each_time(self, ledger: Ledger) -> None:
        """Unsaved changes to one copy reach neither the ledger nor the next copy."""
        org = organisation()
        self.save(ledger, org)
        first = ledger.get(org.id, Organisation)
        first.update_settings(OrganisationSettings(name="Never saved"), AT)
        again = ledger.get(org.id, Organisation)
        assert again is not first
        assert (again.version, again.name) == (1, "Acme")

    def test_get_with_another_kind_raises_not_found(self, ledger: Ledger) -> None:
        """The kind is checked with isinstance: a base class finds the aggregate, another
        kind does not (as if the id were unknown)."""
        org = organisation()
        project = Project.create(project_id=uuid4(), organisation_id=org.id, name="Web", at=AT)
        self.save(ledger, org, project)
        with pytest.raises(NotFound) as info:
            ledger.get(project.id, Organisation)
        assert (info.value.kind, info.value.ident) == ("Organisation", project.id)
        assert isinstance(ledger.get(project.id, Aggregate), Project)

    def test_events_come_back_with_their_fields_intact(self, ledger: Ledger) -> None:
        """Decimals keep their digits, UUIDs stay UUIDs, datetimes stay aware and the same
        instant, given back in UTC: the ledger keeps instants, not the zone they were in."""
        published_at = datetime(2026, 9, 10, 14, 30, 15, 123456, tzinfo=IST)
        charges = (
            ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0035")),
            ChargeSpec("storage_gb", "graduated", tiers=(
                TierSpec(Decimal("100.50"), Decimal("2.50")),
                TierSpec(None, Decimal("1.75"), flat_fee=Decimal("10.00")),
            )),
        )
        plan = Plan.publish(f"p{uuid4().hex[:12]}", "Pro", "INR", Decimal("500.00"),
                            Decimal("1E+3"), charges, METERS, published_at)
        org = organisation()
        project = Project.create(project_id=uuid4(), organisation_id=org.id, name="Web", at=AT)
        self.save(ledger, plan, org, project)

        version = ledger.get(plan.id, Plan).latest
        assert (str(version.base_fee), str(version.minimum)) == ("500.00", "1E+3")
        assert version.charges == charges
        assert [str(t.up_to) for t in version.charges[1].tiers] == ["100.50", "None"]
        assert all(type(t.unit_price) is Decimal for t in version.charges[1].tiers)
        assert version.published_at == published_at
        assert version.published_at.utcoffset() == timedelta(0)
        got = ledger.get(project.id, Project)
        assert type(got.organisation_id) is UUID and got.organisation_id == org.id
        assert got.created_on == AT and got.created_on.tzinfo is not None

    # ---- positions ----------------------------------------------------------------------------

    def test_save_returns_the_position_of_its_last_event(self, ledger: Ledger) -> None:
        """Every event has its own position, after every earlier one: a save of n events
        returns a position at least n past the previous save's."""
        org = organisation()
        first = self.save(ledger, org)
        assert first > 0
        copy = ledger.get(org.id, Organisation)
        copy.update_settings(OrganisationSettings(name="Acme Two"), AT)
        project = Project.create(project_id=uuid4(), organisation_id=org.id, name="Web", at=AT)
        second = self.save(ledger, copy, project)
        assert second >= first + 2
        third = self.save(ledger, organisation())
        assert third >= second + 1

    def test_saving_nothing_new_returns_the_head(self, ledger: Ledger) -> None:
        """No pending events: nothing is appended, and the answer is the newest position (0 on
        an empty ledger), never a position of its own."""
        assert self.save(ledger) == 0
        org = organisation()
        head = self.save(ledger, org)
        assert self.save(ledger, org) == head
        assert self.save(ledger, ledger.get(org.id, Organisation)) == head
        newer = self.save(ledger, organisation())
        assert self.save(ledger, org) == newer
        assert ledger.get(org.id, Organisation).version == 1

    # ---- conflicts ----------------------------------------------------------------------------

    def test_a_stale_copy_conflicts_and_appends_nothing(self, ledger: Ledger) -> None:
        org = organisation()
        self.save(ledger, org)
        mine, theirs = ledger.get(org.id, Organisation), ledger.get(org.id, Organisation)
        mine.update_settings(OrganisationSettings(name="Mine"), AT)
        won = self.save(ledger, mine)
        theirs.update_settings(OrganisationSettings(name="Theirs"), AT)
        with pytest.raises(Conflict):
            self.save(ledger, theirs)
        assert named(ledger, org.id) == (2, "Mine")
        assert self.save(ledger, organisation()) > won

    def test_a_new_aggregate_whose_id_exists_conflicts(self, ledger: Ledger) -> None:
        """Ids are the ledger's, not a kind's: a new aggregate of any kind cannot take one."""
        org = organisation()
        self.save(ledger, org)
        with pytest.raises(Conflict):
            self.save(ledger, organisation(org.id, name="Impostor"))
        with pytest.raises(Conflict):
            self.save(ledger, Project.create(project_id=org.id, organisation_id=org.id, name="Web",
                                             at=AT))
        assert named(ledger, org.id) == (1, "Acme")

    def test_two_new_aggregates_with_one_id_in_one_save_conflict(self, ledger: Ledger) -> None:
        ident = uuid4()
        with pytest.raises(Conflict):
            self.save(ledger, organisation(ident), organisation(ident, name="Twin"))
        with pytest.raises(NotFound):
            ledger.get(ident, Organisation)

    def test_a_save_of_several_aggregates_is_all_or_nothing(self, ledger: Ledger) -> None:
        """One stale aggregate anywhere in a save: none of its aggregates gets any event."""
        fresh, contested = organisation(), organisation()
        self.save(ledger, fresh, contested)
        stale = ledger.get(contested.id, Organisation)
        winner = ledger.get(contested.id, Organisation)
        winner.update_settings(OrganisationSettings(name="Winner"), AT)
        self.save(ledger, winner)

        changed = ledger.get(fresh.id, Organisation)
        changed.update_settings(OrganisationSettings(name="Lost with the rest"), AT)
        changed.set_suspended(True, "unpaid", AT)
        stale.update_settings(OrganisationSettings(name="Stale"), AT)
        project = Project.create(project_id=uuid4(), organisation_id=fresh.id, name="Web", at=AT)
        with pytest.raises(Conflict):
            self.save(ledger, changed, stale, project)

        assert named(ledger, fresh.id) == (1, "Acme")
        assert named(ledger, contested.id) == (2, "Winner")
        with pytest.raises(NotFound):
            ledger.get(project.id, Project)

    def test_a_batch_with_one_conflict_appends_nothing_and_each_can_then_be_saved_alone(
            self, ledger: Ledger) -> None:
        """save_batch is all or nothing, refused as a Conflict (never the store's own error),
        and leaves every aggregate's events pending: the invoice run's fallback saves them one
        by one, the one that exists conflicting again."""
        taken = organisation()
        self.save(ledger, taken)
        fresh, clash = organisation(), organisation(taken.id, name="Clash")
        with pytest.raises(Conflict):
            ledger.save_batch([(fresh,), (clash,)], actor=None)
        with pytest.raises(NotFound):
            ledger.get(fresh.id, Organisation)
        self.save(ledger, fresh)
        assert named(ledger, fresh.id) == (1, "Acme")
        with pytest.raises(Conflict):
            self.save(ledger, clash)

    def test_interleaved_saves_of_two_copies_one_wins_each_version(self, ledger: Ledger) -> None:
        """Any interleaving of two copies of one aggregate, each change saved at once: a save
        wins exactly when its copy had the newest version, so one copy wins each version;
        positions only grow; the ledger ends with exactly the winners' changes. A loser gets a
        fresh copy (as a service retrying a Conflict does); a step may also refresh first."""
        steps = st.lists(st.tuples(st.integers(0, 1), st.booleans()), max_size=INTERLEAVED_STEPS_MAX)

        @settings(max_examples=self.PROPERTY_EXAMPLES, deadline=None, database=None)
        @given(steps=steps)
        def interleave(steps: list[tuple[int, bool]]) -> None:
            org = organisation()
            last = self.save(ledger, org)
            copies = [ledger.get(org.id, Organisation), ledger.get(org.id, Organisation)]
            newest, winners = 1, list[str]()
            for index, (which, refresh) in enumerate(steps):
                if refresh:
                    copies[which] = ledger.get(org.id, Organisation)
                copy = copies[which]
                should_win = copy.version == newest
                name = f"step {index}"
                copy.update_settings(OrganisationSettings(name=name), AT)
                try:
                    position = self.save(ledger, copy)
                except Conflict:
                    assert not should_win, f"{name} was on the newest version"
                    copies[which] = ledger.get(org.id, Organisation)
                    continue
                assert should_win, f"{name} was on version {copy.version - 1} < {newest}"
                assert position > last
                last, newest = position, newest + 1
                winners.append(name)
            got = ledger.get(org.id, Organisation)
            assert got.version == 1 + len(winners) == newest
            assert got.name == (winners[-1] if winners else "Acme")

        interleave()


def organisation(ident: UUID | None = None, *, name: str = "Acme") -> Organisation:
    """A new organisation (one pending Created event)."""
    return Organisation.create(org_id=ident or uuid4(),
                               settings=OrganisationSettings(name=name, billing_email="ap@acme.in"), at=AT)


def named(ledger: Ledger, ident: UUID) -> tuple[int, str]:
    """An organisation's version and name, as the ledger has it now."""
    got = ledger.get(ident, Organisation)
    return got.version, got.name
