"""Read models of the catalogue: meters, projects and API keys (keys without their secrets'
plain text, which is never recorded anywhere)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Connection, Cursor
from psycopg.rows import dict_row

from domain.api_key import ApiKey
from domain.meter import Meter
from domain.project import Project
from projections.base import ReadModel, require_row

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

_METER_COLUMNS = "code, name, aggregation, field, group_by, allow_negative, created_at"


def meters(conn: Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_METER_COLUMNS} FROM meters ORDER BY code LIMIT %s", (LIST_MAX_ROWS,))
        return cur.fetchall()


def project(conn: Connection[Any], project_id: UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT id, organisation_id, name, created_at FROM projects WHERE id = %s",
                    (project_id,))
        return cur.fetchone()


def api_keys(conn: Connection[Any], project_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, project_id, name, prefix, expires_at, revoked_at, created_at, allowed_ips"
            " FROM api_keys"
            " WHERE project_id = %s ORDER BY created_at, id LIMIT %s",
            (project_id, LIST_MAX_ROWS),
        )
        return cur.fetchall()


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
) -> list[dict[str, Any]]:
    """Keys (with their organisation's settings) whose key changed after `key_position` or whose
    organisation changed after `organisation_position`: what each API process's key cache
    reloads. Two positions because keys and organisations are two read models, whose projectors
    commit independently: the caller passes each model's tracking position, read in the same
    snapshot as these rows (adapters/caches.py), never one position for both."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {_KEY_COLUMNS}{_KEYS} WHERE k.ledger_position > %(k)s"
            f" UNION SELECT {_KEY_COLUMNS}{_KEYS} WHERE o.ledger_position > %(o)s",
            {"k": key_position, "o": organisation_position},
        )
        return cur.fetchall()


def key_by_prefix(conn: Connection[Any], prefix: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_KEY_COLUMNS}{_KEYS} WHERE k.prefix = %s", (prefix,))
        return cur.fetchone()
