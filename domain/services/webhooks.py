"""Tenant webhooks: register an organisation's endpoint (its secret shown once), delete one, and
re-send one delivery. Get -> decide -> save over the ledger; the outbox and the sender live in
projections/webhook_endpoints.py and adapters/tenant_webhooks.py (docs/WEBHOOKS.md)."""

from __future__ import annotations

from uuid import UUID

from domain.audit import Actor
from domain.errors import NotFound
from domain.organisation import Organisation
from domain.ports import Clock, DestinationCheck, Ledger, NewId, NewWebhookSecret
from domain.services.base import Written, with_retries
from domain.webhook_endpoint import WebhookEndpoint, check_endpoint


class WebhooksService:
    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId, new_secret: NewWebhookSecret,
                 destination_check: DestinationCheck) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id
        self._new_secret = new_secret
        self._check_destination = destination_check

    def _organisation(self, org_id: UUID) -> Organisation:
        try:
            return self._ledger.get(org_id, Organisation)
        except NotFound:
            raise NotFound("organisation", org_id) from None

    def endpoint(self, org_id: UUID, endpoint_id: UUID) -> WebhookEndpoint:
        """The organisation's endpoint; another organisation's is NotFound, as if none."""
        try:
            endpoint = self._ledger.get(endpoint_id, WebhookEndpoint)
        except NotFound:
            raise NotFound("webhook endpoint", endpoint_id) from None
        if endpoint.organisation_id != org_id:
            raise NotFound("webhook endpoint", endpoint_id)
        return endpoint

    def register(self, org_id: UUID, *, url: str, events: list[str],
                 actor: Actor | None) -> Written[WebhookEndpoint]:
        """A new endpoint: its URL must be http(s) and resolve to a public address (unless the
        operator allows private ones). The answer holds the secret: the only time it is shown."""
        self._organisation(org_id)
        check_endpoint(url, events)  # before the destination's name is looked up
        self._check_destination(url)
        endpoint = WebhookEndpoint.register(
            endpoint_id=self._new_id(), organisation_id=org_id, url=url, events=events,
            secret=self._new_secret(), at=self._clock())
        return Written(endpoint, self._ledger.save(endpoint, actor=actor))

    def delete(self, org_id: UUID, endpoint_id: UUID, *, actor: Actor | None) -> int:
        """Stop sending to it (deliveries still due are cancelled); the ledger position, 0 when
        it was deleted already."""
        def attempt() -> int:
            endpoint = self.endpoint(org_id, endpoint_id)
            if not endpoint.delete(self._clock()):
                return 0
            return self._ledger.save(endpoint, actor=actor)

        return with_retries(attempt)

    def resend(self, org_id: UUID, endpoint_id: UUID, delivery_id: UUID, *,
               actor: Actor | None) -> int:
        """Send one delivery to its endpoint again, now (a dead-lettered one too)."""
        def attempt() -> int:
            endpoint = self.endpoint(org_id, endpoint_id)
            endpoint.resend(delivery_id, self._clock())
            return self._ledger.save(endpoint, actor=actor)

        return with_retries(attempt)
