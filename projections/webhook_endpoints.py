"""The tenant webhooks read model: each organisation's endpoints, and the outbox of deliveries
the sender (adapters/tenant_webhooks.py) works through (docs/WEBHOOKS.md).

Applied in ledger order by one projector, so the endpoints a tenant event is delivered to are
exactly those registered, subscribed and not deleted at that point in the ledger:
- `webhook_endpoints`: one row per WebhookEndpoint (its secret too: the sender signs with it;
  no query of the API returns it).
- `webhook_subjects`: what the catalogue (domain/tenant_webhooks.py) remembers of each invoice
  and payment, to build an event's body and find its organisation.
- `webhook_deliveries`: the outbox. One row per (endpoint, tenant event), written once: its id
  is derived from both and an insert of an existing one does nothing. Its body is fixed when
  written. The sender alone moves its state (pending -> delivered | dead); a deletion cancels
  what is pending; a re-send (WebhookEndpoint.DeliveryResent) makes it pending again, once per
  ledger position.

Disposable in part: a rebuild empties and replays the endpoints and subjects; the outbox is not
emptied (it holds what was sent), and the replay finds every delivery already written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.types.json import Jsonb

from domain.tenant_webhooks import (
    SUBJECT_FACTS,
    TENANT_EVENTS,
    Facts,
    delivery_ref,
    envelope,
    event_ref,
    organisation_of,
)
from domain.webhook_endpoint import WebhookEndpoint
from projections.base import Handler, ReadModel, all_rows, one_row, require_row

NAME = "webhook_endpoints"
LIST_MAX_ROWS = 1000
PENDING, DELIVERED, DEAD, CANCELLED = "pending", "delivered", "dead", "cancelled"
DELIVERY_STATUSES = (PENDING, DELIVERED, DEAD, CANCELLED)

DDL = (
    """CREATE TABLE IF NOT EXISTS webhook_endpoints (
        id uuid PRIMARY KEY,
        organisation_id uuid NOT NULL,
        url text NOT NULL,
        events text[] NOT NULL,
        secret text NOT NULL,
        created_at timestamptz NOT NULL,
        deleted_at timestamptz,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS webhook_endpoints_by_org ON webhook_endpoints"
    " (organisation_id, created_at, id)",
    """CREATE TABLE IF NOT EXISTS webhook_subjects (
        id uuid PRIMARY KEY,
        facts jsonb NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        id uuid PRIMARY KEY,
        endpoint_id uuid NOT NULL,
        organisation_id uuid NOT NULL,
        event_id uuid NOT NULL,
        event_type text NOT NULL,
        body text NOT NULL,
        created_at timestamptz NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz,
        first_attempt_at timestamptz,
        last_attempt_at timestamptz,
        last_status_code integer,
        last_error text,
        delivered_at timestamptz,
        resent_position bigint NOT NULL DEFAULT 0,
        ledger_position bigint NOT NULL,
        UNIQUE (endpoint_id, event_id)
    )""",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at)"
    " WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_by_org ON webhook_deliveries"
    " (organisation_id, created_at, id)",
)


# ---- endpoints ----------------------------------------------------------------------------------

def _registered(cur: Cursor[Any], e: WebhookEndpoint.Registered, position: int) -> None:
    cur.execute(
        "INSERT INTO webhook_endpoints (id, organisation_id, url, events, secret, created_at,"
        " version, ledger_position) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.organisation_id, e.url, list(e.events), e.secret, e.timestamp,
         e.originator_version, position))


def _deleted(cur: Cursor[Any], e: WebhookEndpoint.Deleted, position: int) -> None:
    cur.execute("UPDATE webhook_endpoints SET deleted_at = %s, version = %s, ledger_position = %s"
                " WHERE id = %s", (e.timestamp, e.originator_version, position, e.originator_id))
    require_row(cur, "webhook endpoint", e.originator_id)
    cur.execute("UPDATE webhook_deliveries SET status = %s, next_attempt_at = NULL"
                " WHERE endpoint_id = %s AND status = %s", (CANCELLED, e.originator_id, PENDING))


def _resent(cur: Cursor[Any], e: WebhookEndpoint.DeliveryResent, position: int) -> None:
    # Once per ledger position: a rebuild's replay does not send it yet again.
    cur.execute(
        "UPDATE webhook_deliveries SET status = %s, next_attempt_at = %s, first_attempt_at = NULL,"
        " resent_position = %s WHERE id = %s AND endpoint_id = %s AND resent_position < %s",
        (PENDING, e.timestamp, position, e.delivery_id, e.originator_id, position))


# ---- subjects and tenant events ---------------------------------------------------------------

def _facts(cur: Cursor[Any], subject: UUID) -> Facts:
    cur.execute("SELECT facts FROM webhook_subjects WHERE id = %s", (subject,))
    row = cur.fetchone()
    return dict(row[0]) if row else {}


def _on(kind: type[Any]) -> Handler:
    """The handler of one ledger event: fold it into its subject's facts, then write one
    delivery per endpoint of the organisation subscribed to the tenant event it makes."""
    fold = SUBJECT_FACTS.get(kind)
    tenant_event = TENANT_EVENTS.get(kind)

    def handle(cur: Cursor[Any], e: Any, position: int) -> None:
        facts = _facts(cur, e.originator_id)
        if fold is not None:
            facts = fold(e, facts)
            cur.execute("INSERT INTO webhook_subjects (id, facts) VALUES (%s, %s)"
                        " ON CONFLICT (id) DO UPDATE SET facts = EXCLUDED.facts",
                        (e.originator_id, Jsonb(facts)))
        if tenant_event is None:
            return
        organisation = organisation_of(e, facts)
        data = tenant_event.data(e, facts)
        if organisation is None or data is None:
            return
        event_id = event_ref(e.originator_id, e.originator_version)
        body = envelope(event_id, tenant_event.name, organisation, e.timestamp, data).decode()
        cur.execute("SELECT id FROM webhook_endpoints WHERE organisation_id = %s"
                    " AND deleted_at IS NULL AND %s = ANY(events) ORDER BY id",
                    (organisation, tenant_event.name))
        for (endpoint_id,) in cur.fetchall():
            cur.execute(
                "INSERT INTO webhook_deliveries (id, endpoint_id, organisation_id, event_id,"
                " event_type, body, created_at, status, next_attempt_at, ledger_position)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                (delivery_ref(endpoint_id, event_id), endpoint_id, organisation, event_id,
                 tenant_event.name, body, e.timestamp, PENDING, e.timestamp, position))

    return handle


_HANDLERS: dict[type[Any], Handler] = {
    WebhookEndpoint.Registered: _registered,
    WebhookEndpoint.Deleted: _deleted,
    WebhookEndpoint.DeliveryResent: _resent,
    **{kind: _on(kind) for kind in (*SUBJECT_FACTS, *TENANT_EVENTS)},
}

READ_MODEL = ReadModel(
    name=NAME, ddl=DDL,
    tables=("webhook_endpoints", "webhook_subjects"),  # not the outbox: see the docstring
    handlers=_HANDLERS,
)


# ---- queries ------------------------------------------------------------------------------------

class EndpointRow(msgspec.Struct, frozen=True):
    id: UUID
    organisation_id: UUID
    url: str
    events: list[str]
    created_at: datetime


class DeliveryRow(msgspec.Struct, frozen=True):
    id: UUID
    endpoint_id: UUID
    organisation_id: UUID
    event_id: UUID
    event_type: str
    created_at: datetime
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None


_ENDPOINT_COLUMNS = "id, organisation_id, url, events, created_at"
_DELIVERY_COLUMNS = ("id, endpoint_id, organisation_id, event_id, event_type, created_at, status,"
                     " attempts, next_attempt_at, last_attempt_at, last_status_code, last_error,"
                     " delivered_at")


def endpoints(conn: Connection[Any], organisation_id: UUID) -> list[EndpointRow]:
    """The organisation's endpoints not deleted, oldest first (never their secrets)."""
    return all_rows(conn, EndpointRow,
                    f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE organisation_id = %s"
                    " AND deleted_at IS NULL ORDER BY created_at, id LIMIT %s",
                    (organisation_id, LIST_MAX_ROWS))


def delivery(conn: Connection[Any], delivery_id: UUID) -> DeliveryRow | None:
    return one_row(conn, DeliveryRow,
                   f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = %s",
                   (delivery_id,))


def deliveries(conn: Connection[Any], organisation_id: UUID, limit: int,
               after: tuple[datetime, UUID] | None = None, *, status: str | None = None,
               endpoint_id: UUID | None = None) -> list[DeliveryRow]:
    """The organisation's deliveries, oldest first, after a (created_at, id) cursor."""
    where: list[str] = ["organisation_id = %s"]
    params: list[Any] = [organisation_id]
    if after is not None:
        where.append("(created_at, id) > (%s, %s)")
        params += list(after)
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if endpoint_id is not None:
        where.append("endpoint_id = %s")
        params.append(endpoint_id)
    return all_rows(conn, DeliveryRow,
                    f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {' AND '.join(where)}"
                    " ORDER BY created_at, id LIMIT %s", (*params, min(limit, LIST_MAX_ROWS)))


def dead_count(conn: Connection[Any]) -> int:
    """Deliveries given up on (for /metrics and operators)."""
    row = conn.execute("SELECT count(*) FROM webhook_deliveries WHERE status = %s",
                       (DEAD,)).fetchone()
    return int(row[0]) if row else 0


