"""Read models of access: admin tokens (hashes only) and the audit trail. Queries answer the
Structs defined here."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor

from domain.access import AdminToken
from domain.audit import AuditEntry
from projections.base import ReadModel, all_rows, one_row, require_row

NAME = "access"
AUDIT_PAGE_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS admin_tokens (
        id uuid PRIMARY KEY,
        prefix text NOT NULL,
        token_sha256 text NOT NULL,
        role text NOT NULL,
        organisation_id uuid,
        name text NOT NULL,
        expires_at timestamptz,
        revoked_at timestamptz,
        created_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS admin_tokens_by_prefix ON admin_tokens (prefix)",
    "CREATE INDEX IF NOT EXISTS admin_tokens_by_position ON admin_tokens (ledger_position)",
    """CREATE TABLE IF NOT EXISTS audit_events (
        id uuid PRIMARY KEY,
        at timestamptz NOT NULL,
        actor_id uuid NOT NULL,
        role text NOT NULL,
        source_ip text NOT NULL,
        request_id text NOT NULL,
        action text NOT NULL,
        organisation_id uuid,
        targets jsonb NOT NULL,
        changes jsonb NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_by_position ON audit_events (ledger_position)",
)


def _issued(cur: Cursor[Any], e: AdminToken.Issued, position: int) -> None:
    cur.execute(
        "INSERT INTO admin_tokens (id, prefix, token_sha256, role, organisation_id, name,"
        " expires_at, created_at, ledger_position) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.prefix, e.token_sha256, e.role, e.organisation_id, e.name,
         e.expires_at, e.timestamp, position),
    )


def _revoked(cur: Cursor[Any], e: AdminToken.Revoked, position: int) -> None:
    cur.execute("UPDATE admin_tokens SET revoked_at = %s, ledger_position = %s WHERE id = %s",
                (e.timestamp, position, e.originator_id))
    require_row(cur, "admin token", e.originator_id)


def _audited(cur: Cursor[Any], e: AuditEntry.Recorded, position: int) -> None:
    cur.execute(
        "INSERT INTO audit_events (id, at, actor_id, role, source_ip, request_id, action,"
        " organisation_id, targets, changes, ledger_position)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.timestamp, e.actor_id, e.role, e.source_ip, e.request_id, e.action,
         e.organisation_id, json.dumps(e.targets), json.dumps(e.changes), position),
    )


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("admin_tokens", "audit_events"),
    handlers={AdminToken.Issued: _issued, AdminToken.Revoked: _revoked,
              AuditEntry.Recorded: _audited},
)



class TokenAccessRow(msgspec.Struct, frozen=True):
    """What authenticating with an admin token needs: its hash, and for an
    organisation-scoped token its organisation's allow-list ("" = every address)."""

    id: UUID
    prefix: str
    token_sha256: str
    role: str
    organisation_id: UUID | None
    expires_at: datetime | None
    revoked_at: datetime | None
    organisation_allowed_ips: str


class AuditRow(msgspec.Struct, frozen=True):
    id: UUID
    at: datetime
    actor_id: UUID
    role: str
    source_ip: str
    request_id: str
    action: str
    organisation_id: UUID | None
    targets: list[dict[str, str]]
    changes: list[dict[str, dict[str, str | None]]]
    ledger_position: int


_TOKEN_COLUMNS = (
    "t.id, t.prefix, t.token_sha256, t.role, t.organisation_id, t.expires_at, t.revoked_at,"
    " COALESCE(o.allowed_ips, '') AS organisation_allowed_ips"
)
# An organisation-scoped token carries its organisation's allow-list (the organisations model).
_TOKENS = " FROM admin_tokens t LEFT JOIN organisations o ON o.id = t.organisation_id"


def token_by_prefix(conn: Connection[Any], prefix: str) -> TokenAccessRow | None:
    return one_row(conn, TokenAccessRow, f"SELECT {_TOKEN_COLUMNS}{_TOKENS} WHERE t.prefix = %s",
                   (prefix,))


def tokens_changed_since(
    conn: Connection[Any], token_position: int, organisation_position: int
) -> list[TokenAccessRow]:
    """Tokens changed after `token_position`, or whose organisation changed after
    `organisation_position`: what each API process's token cache reloads. The caller passes
    each read model's tracking position, read in the same snapshot (adapters/caches.py)."""
    return all_rows(
        conn, TokenAccessRow,
        f"SELECT {_TOKEN_COLUMNS}{_TOKENS} WHERE t.ledger_position > %(t)s"
        f" UNION SELECT {_TOKEN_COLUMNS}{_TOKENS} WHERE o.ledger_position > %(o)s",
        {"t": token_position, "o": organisation_position})


def audit_page(
    conn: Connection[Any], limit: int, after_position: int, *, organisation_id: UUID | None = None,
    actor_id: UUID | None = None, action: str | None = None, since: datetime | None = None,
    until: datetime | None = None,
) -> list[AuditRow]:
    """Audit entries in ledger order, after a position, with optional filters."""
    assert 0 < limit <= AUDIT_PAGE_MAX_ROWS + 1
    return all_rows(
        conn, AuditRow,
        "SELECT id, at, actor_id, role, source_ip, request_id, action, organisation_id, targets,"
        " changes, ledger_position FROM audit_events WHERE ledger_position > %(after)s"
        " AND (%(org)s::uuid IS NULL OR organisation_id = %(org)s)"
        " AND (%(actor)s::uuid IS NULL OR actor_id = %(actor)s)"
        " AND (%(action)s::text IS NULL OR action LIKE '%%' || %(action)s || '%%')"
        " AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
        " AND (%(until)s::timestamptz IS NULL OR at < %(until)s)"
        " ORDER BY ledger_position LIMIT %(limit)s",
        {"after": after_position, "org": organisation_id, "actor": actor_id, "action": action,
         "since": since, "until": until, "limit": limit},
    )


def organisation_of(conn: Connection[Any], kind: str, ident: UUID) -> UUID | None:
    """The organisation a project, API key or invoice belongs to (None if unknown)."""
    table = {"project": "projects", "api_key": "api_keys", "invoice": "invoices"}[kind]
    row = conn.execute(f"SELECT organisation_id FROM {table} WHERE id = %s", (ident,)).fetchone()
    return row[0] if row else None
