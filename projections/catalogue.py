"""Read models of the catalogue: meters, projects and API keys (keys without their secrets'
plain text, which is never recorded anywhere). Queries answer the Structs defined here."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor

from domain.api_key import ApiKey
from domain.meter import Meter
from domain.project import Project
from projections.base import ReadModel, all_rows, one_row, require_row

LIST_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS meters (
        code text PRIMARY KEY,
        id uuid NOT NULL,
        name text NOT NULL,
        aggregation text NOT NULL,
        field text,
        group_by text[] NOT NULL,
        allow_negative boolean NOT NULL,
        created_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS projects (
        id uuid PRIMARY KEY,
        organisation_id uuid NOT NULL,
        name text NOT NULL,
        created_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS projects_by_org ON projects (organisation_id)",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id uuid PRIMARY KEY,
        prefix text NOT NULL UNIQUE,
        secret_sha256 text NOT NULL,
        project_id uuid NOT NULL,
        organisation_id uuid NOT NULL,
        name text NOT NULL,
        expires_at timestamptz,
        revoked_at timestamptz,
        created_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_by_project ON api_keys (project_id)",
    "ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS allowed_ips text NOT NULL DEFAULT ''",
    "CREATE INDEX IF NOT EXISTS api_keys_by_position ON api_keys (ledger_position)",
)


def _meter_defined(cur: Cursor[Any], e: Meter.Defined, position: int) -> None:
    cur.execute(
        "INSERT INTO meters (code, id, name, aggregation, field, group_by, allow_negative,"
        " created_at, ledger_position) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.code, e.originator_id, e.name, e.aggregation, e.field, list(e.group_by),
         e.allow_negative, e.timestamp, position),
    )


def _meter_redefined(cur: Cursor[Any], e: Meter.Redefined, position: int) -> None:
    cur.execute(
        "UPDATE meters SET name = %s, aggregation = %s, field = %s, group_by = %s,"
        " allow_negative = %s, ledger_position = %s WHERE id = %s",
        (e.name, e.aggregation, e.field, list(e.group_by), e.allow_negative, position,
         e.originator_id),
    )
    require_row(cur, "meter", e.originator_id)


def _project_created(cur: Cursor[Any], e: Project.Created, position: int) -> None:
    cur.execute(
        "INSERT INTO projects (id, organisation_id, name, created_at, ledger_position)"
        " VALUES (%s, %s, %s, %s, %s)",
        (e.originator_id, e.organisation_id, e.name, e.timestamp, position),
    )


def _key_created(cur: Cursor[Any], e: ApiKey.Created, position: int) -> None:
    cur.execute(
        "INSERT INTO api_keys (id, prefix, secret_sha256, project_id, organisation_id, name,"
        " expires_at, created_at, ledger_position, allowed_ips)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.originator_id, e.prefix, e.secret_sha256, e.project_id, e.organisation_id, e.name,
         e.expires_at, e.timestamp, position, e.allowed_ips),
    )


def _key_expiry(cur: Cursor[Any], e: ApiKey.ExpiryBrought, position: int) -> None:
    cur.execute("UPDATE api_keys SET expires_at = %s, ledger_position = %s WHERE id = %s",
                (e.expires_at, position, e.originator_id))
    require_row(cur, "api key", e.originator_id)


def _key_revoked(cur: Cursor[Any], e: ApiKey.Revoked, position: int) -> None:
    cur.execute(
        "UPDATE api_keys SET revoked_at = %s, ledger_position = %s WHERE id = %s",
        (e.timestamp, position, e.originator_id),
    )
    require_row(cur, "api key", e.originator_id)


READ_MODEL = ReadModel(
    name="catalogue",
    ddl=DDL,
    tables=("meters", "projects", "api_keys"),
    handlers={
        Meter.Defined: _meter_defined,
        Meter.Redefined: _meter_redefined,
        Project.Created: _project_created,
        ApiKey.Created: _key_created,
        ApiKey.Revoked: _key_revoked,
        ApiKey.ExpiryBrought: _key_expiry,
    },
)



class MeterRow(msgspec.Struct, frozen=True):
    code: str
    name: str
    aggregation: str  # count | sum | max | unique_count | latest
    field: str | None
    group_by: tuple[str, ...]
    allow_negative: bool
    created_at: datetime


class ProjectRow(msgspec.Struct, frozen=True):
    id: UUID
    organisation_id: UUID
    name: str
    created_at: datetime


class ApiKeyRow(msgspec.Struct, frozen=True):
    """An API key as listed: never its secret, nor the secret's hash."""

    id: UUID
    project_id: UUID
    name: str
    prefix: str
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    allowed_ips: str  # canonical CIDRs, comma-separated ("" = every address)


class KeyAccessRow(msgspec.Struct, frozen=True):
    """What authenticating with a key needs: the key's hash and its organisation's settings."""

    id: UUID
    prefix: str
    secret_sha256: str
    project_id: UUID
    organisation_id: UUID
    expires_at: datetime | None
    revoked_at: datetime | None
    allowed_ips: str
    timezone: str
    suspended: bool
    organisation_allowed_ips: str
    rate_limit_per_s: int
    rate_limit_burst: int


_METER_COLUMNS = "code, name, aggregation, field, group_by, allow_negative, created_at"


def meters(conn: Connection[Any]) -> list[MeterRow]:
    return all_rows(conn, MeterRow, f"SELECT {_METER_COLUMNS} FROM meters ORDER BY code LIMIT %s",
                    (LIST_MAX_ROWS,))


def meter(conn: Connection[Any], code: str) -> MeterRow | None:
    """One meter, or None for an unknown code."""
    return one_row(conn, MeterRow, f"SELECT {_METER_COLUMNS} FROM meters WHERE code = %s", (code,))


def project(conn: Connection[Any], project_id: UUID) -> ProjectRow | None:
    return one_row(conn, ProjectRow,
                   "SELECT id, organisation_id, name, created_at FROM projects WHERE id = %s",
                   (project_id,))


def projects_page(conn: Connection[Any], organisation_id: UUID, limit: int,
                  after_cursor: tuple[datetime, UUID] | None) -> list[ProjectRow]:
    """An organisation's projects oldest first (created_at, id), `limit` at most, after the
    cursor."""
    assert 0 < limit <= LIST_MAX_ROWS + 1  # one more than a page: is there a next one?
    at, ident = after_cursor if after_cursor is not None else (None, None)
    return all_rows(
        conn, ProjectRow,
        "SELECT id, organisation_id, name, created_at FROM projects WHERE organisation_id = %(org)s"
        " AND (%(at)s::timestamptz IS NULL OR (created_at, id) > (%(at)s, %(id)s))"
        " ORDER BY created_at, id LIMIT %(limit)s",
        {"org": organisation_id, "at": at, "id": ident, "limit": limit},
    )


def api_keys(conn: Connection[Any], project_id: UUID) -> list[ApiKeyRow]:
    return all_rows(
        conn, ApiKeyRow,
        "SELECT id, project_id, name, prefix, expires_at, revoked_at, created_at, allowed_ips"
        " FROM api_keys"
        " WHERE project_id = %s ORDER BY created_at, id LIMIT %s",
        (project_id, LIST_MAX_ROWS),
    )


def live_key_count(conn: Connection[Any], project_id: UUID, now: datetime) -> int:
    """Keys of the project that still authenticate: not revoked, not expired at `now`."""
    row = conn.execute(
        "SELECT count(*) FROM api_keys WHERE project_id = %s AND revoked_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > %s)", (project_id, now)).fetchone()
    return int(row[0]) if row else 0


_KEY_COLUMNS = (
    "k.id, k.prefix, k.secret_sha256, k.project_id, k.organisation_id, k.expires_at, k.revoked_at,"
    " k.allowed_ips, o.timezone, o.suspended, o.allowed_ips AS organisation_allowed_ips,"
    " o.rate_limit_per_s, o.rate_limit_burst"
)
_KEYS = " FROM api_keys k JOIN organisations o ON o.id = k.organisation_id"


def keys_changed_since(
    conn: Connection[Any], key_position: int, organisation_position: int
) -> list[KeyAccessRow]:
    """Keys (with their organisation's settings) whose key changed after `key_position` or whose
    organisation changed after `organisation_position`: what each API process's key cache
    reloads. Two positions because keys and organisations are two read models, whose projectors
    commit independently: the caller passes each model's tracking position, read in the same
    snapshot as these rows (adapters/caches.py), never one position for both."""
    return all_rows(
        conn, KeyAccessRow,
        f"SELECT {_KEY_COLUMNS}{_KEYS} WHERE k.ledger_position > %(k)s"
        f" UNION SELECT {_KEY_COLUMNS}{_KEYS} WHERE o.ledger_position > %(o)s",
        {"k": key_position, "o": organisation_position},
    )


def key_by_prefix(conn: Connection[Any], prefix: str) -> KeyAccessRow | None:
    return one_row(conn, KeyAccessRow, f"SELECT {_KEY_COLUMNS}{_KEYS} WHERE k.prefix = %s", (prefix,))
