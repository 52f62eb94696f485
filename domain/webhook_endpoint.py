"""Tenant webhook endpoints: where an organisation wants its billing events sent (docs/WEBHOOKS.md).

`WebhookEndpoint` is one registered URL with the tenant events it subscribes to and the secret
its deliveries are signed with (shown once, when registered). It is deleted, never edited: a
new URL or a new secret is a new endpoint. A re-send of one delivery to it is recorded on it
(`DeliveryResent`), so the outbox (projections/webhook_endpoints.py) sends it again, and the
audit trail says who asked. The URL's scheme and shape are checked here; whether its host is a
safe destination (no private network) is the caller's port's answer (domain/ports.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, FieldError, ValidationFailed
from domain.tenant_webhooks import EVENT_NAMES

URL_MAX_CHARS = 2048
SCHEMES = ("http", "https")
EVENTS_MAX = 32  # names in one endpoint's list (the catalogue is far shorter)


def check_url(url: str) -> str:
    """The URL if it is an absolute http(s) URL with a host and no credentials; 422 otherwise."""
    problem = None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port  # port: a ValueError when it is not a number
    except ValueError:
        parts, host, port = None, None, None
        problem = "must be an absolute http(s) URL"
    if problem is None and parts is not None:
        if not 0 < len(url) <= URL_MAX_CHARS or any(c.isspace() or ord(c) < 32 for c in url):
            problem = f"must be 1 to {URL_MAX_CHARS} characters without spaces"
        elif parts.scheme not in SCHEMES:
            problem = "must be an http or https URL"
        elif not host:
            problem = "must name a host"
        elif parts.username is not None or parts.password is not None:
            problem = "must not carry a user name or password"
        elif port == 0:
            problem = "must not name port 0"
    if problem:
        raise ValidationFailed([FieldError("url", problem)])
    return url


def check_events(events: list[str]) -> tuple[str, ...]:
    """The subscribed tenant event names, in catalogue order; 422 for an empty, repeated or
    unknown name."""
    problems = []
    if not events or len(events) > EVENTS_MAX:
        problems.append(FieldError("events", f"must name 1 to {EVENTS_MAX} events of "
                                             f"{list(EVENT_NAMES)}"))
    unknown = [e for e in events if e not in EVENT_NAMES]
    if unknown:
        problems.append(FieldError("events", f"unknown events {unknown}: known are "
                                             f"{list(EVENT_NAMES)}"))
    if len(set(events)) != len(events):
        problems.append(FieldError("events", "must not name an event twice"))
    if problems:
        raise ValidationFailed(problems)
    return tuple(name for name in EVENT_NAMES if name in events)


def check_endpoint(url: str, events: list[str]) -> tuple[str, ...]:
    """Both rules at once (one 422 naming every field at fault); the events as check_events."""
    problems: list[FieldError] = []
    checked: tuple[str, ...] = ()
    try:
        check_url(url)
    except ValidationFailed as e:
        problems += e.errors
    try:
        checked = check_events(events)
    except ValidationFailed as e:
        problems += e.errors
    if problems:
        raise ValidationFailed(problems)
    return checked


class WebhookEndpoint(Aggregate):
    """One organisation's receiver of tenant events."""

    class Registered(Aggregate.Created):
        organisation_id: UUID
        url: str
        events: tuple[str, ...]
        secret: str  # signs every delivery; never in the audit trail (domain/audit.py)

    class Deleted(Aggregate.Event):
        """Nothing more is sent to it; deliveries still due are cancelled."""

        def apply(self, aggregate: Any) -> None:
            aggregate.deleted = True

    class DeliveryResent(Aggregate.Event):
        """Send delivery `delivery_id` (to this endpoint) again, now, whatever its state."""

        delivery_id: UUID

    def __init__(self, organisation_id: UUID, url: str, events: tuple[str, ...],
                 secret: str) -> None:
        self.organisation_id = organisation_id
        self.url = url
        self.events = tuple(events)
        self.secret = secret
        self.deleted = False

    @classmethod
    def register(cls, *, endpoint_id: UUID, organisation_id: UUID, url: str, events: list[str],
                 secret: str, at: datetime) -> WebhookEndpoint:
        return cls._create(cls.Registered, id=endpoint_id, timestamp=at,
                           organisation_id=organisation_id, url=url,
                           events=check_endpoint(url, events), secret=secret)

    def delete(self, at: datetime) -> bool:
        """Stop sending to it; False (nothing recorded) when it was deleted already."""
        if self.deleted:
            return False
        self.trigger_event(self.Deleted, timestamp=at)
        return True

    def resend(self, delivery_id: UUID, at: datetime) -> None:
        if self.deleted:
            raise Conflict("the endpoint is deleted: nothing is sent to it any more")
        self.trigger_event(self.DeliveryResent, timestamp=at, delivery_id=delivery_id)
