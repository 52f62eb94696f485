"""Organisation events stored before the rate limits were whole numbers read back as the
same state: SettingsUpdated of class version 1 held them as strings, and is upcast on reading."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from adapters.codec import _ENCODER, MsgspecMapper
from domain.organisation import Organisation, OrganisationSettings

AT = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)


def _as_version_1(event: Any) -> StoredEvent:
    """The event as a process before class version 2 stored it: no class_version, and every
    setting (the rate limits too) a string or None."""
    state = {"timestamp": event.timestamp,
             "before": {k: None if v is None else str(v) for k, v in event.before.items()},
             "after": {k: None if v is None else str(v) for k, v in event.after.items()}}
    return StoredEvent(event.originator_id, event.originator_version,
                       get_topic(Organisation.SettingsUpdated), _ENCODER.encode(state))


def test_a_settings_update_stored_with_string_rate_limits_decodes_to_the_same_state() -> None:
    mapper = MsgspecMapper()
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    org.update_settings(OrganisationSettings(name="Acme Ltd", gstin=None, rate_limit_per_s=150,
                                             rate_limit_burst=300), AT)
    created, updated = org.collect_events()

    back = mapper.to_domain_event(_as_version_1(updated))

    assert back.before == {"name": "Acme", "rate_limit_per_s": 100, "rate_limit_burst": 200}
    assert back.after == {"name": "Acme Ltd", "rate_limit_per_s": 150, "rate_limit_burst": 300}
    replayed = back.mutate(mapper.to_domain_event(mapper.to_stored_event(created)).mutate(None))
    assert replayed.settings() == org.settings()
    assert (replayed.rate_limit_per_s, replayed.rate_limit_burst) == (150, 300)


def test_a_settings_update_is_stored_at_class_version_2_with_whole_numbers() -> None:
    mapper = MsgspecMapper()
    org = Organisation.create(uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in"), AT)
    org.update_settings(OrganisationSettings(rate_limit_per_s=150), AT)
    _, updated = org.collect_events()

    back = mapper.to_domain_event(mapper.to_stored_event(updated))

    assert back.after == {"rate_limit_per_s": 150}
    assert back.before == {"rate_limit_per_s": 100}
