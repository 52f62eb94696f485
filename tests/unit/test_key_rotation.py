"""Rotating an API key: the new key keeps the old one's expiry, and an expired key cannot be
rotated (issue 20, item 8: rotation handed out a key that never expired)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from domain.errors import Conflict
from domain.organisation import Organisation, OrganisationSettings
from domain.services.access import AccessService
from domain.services.catalogue import CatalogueService
from tests.unit.memory import Clock, MemoryLedger

AT = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)
OVERLAP = timedelta(minutes=10)


def _service() -> tuple[AccessService, MemoryLedger, Clock]:
    ledger, clock = MemoryLedger(), Clock(AT)
    service = AccessService(ledger, clock, uuid4,
                            lambda: (secrets.token_hex(6), secrets.token_urlsafe(16)))
    return service, ledger, clock


def _key(service: AccessService, ledger: MemoryLedger, expires_at: datetime | None) -> UUID:
    org = Organisation.create(uuid4(), OrganisationSettings(name="A", billing_email="a@b.in"), AT)
    ledger.save(org)
    project = CatalogueService(ledger, lambda: AT, uuid4).create_project(org.id, "p", actor=None).aggregate
    return service.issue_key(project.id, "k", expires_at, actor=None)[0].aggregate.id


def test_a_rotated_key_expires_when_the_old_one_would_have() -> None:
    service, ledger, _ = _service()
    expires = AT + timedelta(days=30)
    old_id = _key(service, ledger, expires)
    written, _ = service.rotate_key(old_id, OVERLAP, actor=None)
    assert written.aggregate.expires_at == expires


def test_a_key_without_expiry_rotates_to_one_without_expiry() -> None:
    service, ledger, _ = _service()
    old_id = _key(service, ledger, None)
    written, _ = service.rotate_key(old_id, OVERLAP, actor=None)
    assert written.aggregate.expires_at is None


def test_an_expired_key_cannot_be_rotated_and_nothing_is_recorded() -> None:
    service, ledger, clock = _service()
    old_id = _key(service, ledger, AT + timedelta(hours=1))
    clock.now = AT + timedelta(hours=2)
    before = ledger.position
    with pytest.raises(Conflict, match="expired"):
        service.rotate_key(old_id, OVERLAP, actor=None)
    assert ledger.position == before
