"""The Organisation aggregate decides alone: defaults, every broken rule reported, before/after."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from domain.errors import ValidationFailed
from domain.organisation import Organisation, OrganisationSettings

AT = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)


def test_create_fills_billing_defaults_and_takes_the_given_clock() -> None:
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    assert (org.currency, org.timezone, org.country) == ("INR", "Asia/Kolkata", "IN")
    assert org.gstin is None and org.state_code is None
    assert org.created_on == AT


def test_create_reports_every_broken_rule_at_once() -> None:
    with pytest.raises(ValidationFailed) as info:
        Organisation.create(
            uuid4(),
            OrganisationSettings(name=" ", billing_email="nope", currency="USD", timezone="Mars/Base",
                                 country="india", gstin="123", state_code="99"),
            AT,
        )
    fields = {e.field for e in info.value.errors}
    assert fields == {"name", "billing_email", "currency", "timezone", "country", "gstin",
                      "state_code"}


def test_create_requires_name_and_billing_email() -> None:
    with pytest.raises(ValidationFailed) as info:
        Organisation.create(uuid4(), OrganisationSettings(), AT)
    assert {e.field for e in info.value.errors} == {"name", "billing_email"}


def test_gstin_must_belong_to_the_state_code() -> None:
    with pytest.raises(ValidationFailed) as info:
        Organisation.create(
            uuid4(),
            OrganisationSettings(name="A", billing_email="a@b.in", gstin="29ABCDE1234F1Z5", state_code="27"),
            AT,
        )
    assert [e.field for e in info.value.errors] == ["gstin"]
    org = Organisation.create(
        uuid4(),
        OrganisationSettings(name="A", billing_email="a@b.in", gstin="29ABCDE1234F1Z5", state_code="29"),
        AT,
    )
    assert org.gstin == "29ABCDE1234F1Z5"


def test_update_records_before_and_after_of_what_changed_only() -> None:
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    org.collect_events()
    assert org.update_settings(OrganisationSettings(name="Acme Ltd", currency="INR"), AT)
    (event,) = org.collect_events()
    assert isinstance(event, Organisation.SettingsUpdated)
    assert event.before == {"name": "Acme"} and event.after == {"name": "Acme Ltd"}
    assert org.name == "Acme Ltd"


def test_update_that_changes_nothing_emits_nothing() -> None:
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    org.collect_events()
    assert not org.update_settings(OrganisationSettings(name="Acme"), AT)
    assert org.collect_events() == []


def test_invalid_update_changes_nothing() -> None:
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    org.collect_events()
    with pytest.raises(ValidationFailed):
        org.update_settings(OrganisationSettings(name="New", billing_email="broken"), AT)
    assert org.name == "Acme" and org.collect_events() == []
