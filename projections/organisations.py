"""The organisations read model: one row per organisation with its current settings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor, sql

from domain.organisation import ACCESS_SETTING_NAMES, SETTING_NAMES, Organisation
from projections.base import ReadModel, all_rows, one_row, require_row

NAME = "organisations"
LIST_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS organisations (
        id uuid PRIMARY KEY,
        name text NOT NULL,
        billing_email text NOT NULL,
        currency text NOT NULL,
        timezone text NOT NULL,
        country text NOT NULL,
        gstin text,
        state_code text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        version bigint NOT NULL,
        ledger_position bigint NOT NULL
    )""",
    "ALTER TABLE organisations ADD COLUMN IF NOT EXISTS suspended boolean NOT NULL DEFAULT false",
    "ALTER TABLE organisations ADD COLUMN IF NOT EXISTS allowed_ips text NOT NULL DEFAULT ''",
    "ALTER TABLE organisations ADD COLUMN IF NOT EXISTS rate_limit_per_s integer NOT NULL DEFAULT 100",
    "ALTER TABLE organisations ADD COLUMN IF NOT EXISTS rate_limit_burst integer NOT NULL DEFAULT 200",
)


def _created(cur: Cursor[Any], e: Organisation.Created, position: int) -> None:
    cur.execute(
        """INSERT INTO organisations (id, name, billing_email, currency, timezone, country,
               gstin, state_code, created_at, updated_at, version, ledger_position)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (e.originator_id, e.name, e.billing_email, e.currency, e.timezone, e.country,
         e.gstin, e.state_code, e.timestamp, e.timestamp, e.originator_version, position),
    )


def _settings_updated(cur: Cursor[Any], e: Organisation.SettingsUpdated, position: int) -> None:
    # The rate limits are whole numbers (events of class version 1 are upcast on reading).
    changes: dict[str, Any] = {k: v for k, v in e.after.items()
                               if k in SETTING_NAMES or k in ACCESS_SETTING_NAMES}
    changes |= {"updated_at": e.timestamp, "version": e.originator_version,
                "ledger_position": position}
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = %s").format(sql.Identifier(k)) for k in changes
    )
    cur.execute(
        sql.SQL("UPDATE organisations SET {} WHERE id = %s").format(assignments),
        (*changes.values(), e.originator_id),
    )
    require_row(cur, "organisation", e.originator_id)


def _suspension(cur: Cursor[Any], e: Any, position: int) -> None:
    cur.execute(
        "UPDATE organisations SET suspended = %s, updated_at = %s, version = %s,"
        " ledger_position = %s WHERE id = %s",
        (isinstance(e, Organisation.Suspended), e.timestamp, e.originator_version, position,
         e.originator_id),
    )
    require_row(cur, "organisation", e.originator_id)


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("organisations",),
    handlers={
        Organisation.Created: _created,
        Organisation.SettingsUpdated: _settings_updated,
        Organisation.Suspended: _suspension,
        Organisation.Reactivated: _suspension,
    },
)

_COLUMNS = (
    "id, name, billing_email, currency, timezone, country, gstin, state_code, created_at, updated_at,"
    " suspended, allowed_ips, rate_limit_per_s, rate_limit_burst"
)


class OrganisationRow(msgspec.Struct, frozen=True):
    """One organisation with its current settings, as the read model holds it."""

    id: UUID
    name: str
    billing_email: str
    currency: str
    timezone: str
    country: str
    gstin: str | None
    state_code: str | None
    created_at: datetime
    updated_at: datetime
    suspended: bool
    allowed_ips: str  # canonical CIDRs, comma-separated ("" = every address)
    rate_limit_per_s: int
    rate_limit_burst: int


# get_many builds rows from tuples: the columns are the Struct's fields, in order.
assert OrganisationRow.__struct_fields__ == tuple(c.strip() for c in _COLUMNS.split(","))


def row_of(org: Organisation) -> OrganisationRow:
    """An organisation as saved in the ledger, in the read model's shape: what create and
    update answer, without waiting for the read model."""
    settings = {key: getattr(org, key) for key in SETTING_NAMES + ACCESS_SETTING_NAMES}
    return OrganisationRow(id=org.id, created_at=org.created_on, updated_at=org.modified_on,
                           suspended=org.suspended, **settings)


def get_many(conn: Connection[Any], org_ids: Sequence[UUID]) -> dict[UUID, OrganisationRow]:
    """The rows of `org_ids` that the read model has, in one query (an invoice run's batch).
    Rows are built from tuples in _COLUMNS order (the Struct's field order): a third of the
    cost of matching dict keys to fields, on the path of every organisation of a run."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM organisations WHERE id = ANY(%b::uuid[])",
                    (list(org_ids),))
        rows = [OrganisationRow(*found) for found in cur.fetchall()]
    return {row.id: row for row in rows}


def get(conn: Connection[Any], org_id: UUID) -> OrganisationRow | None:
    return one_row(conn, OrganisationRow, f"SELECT {_COLUMNS} FROM organisations WHERE id = %s",
                   (org_id,))


def page(
    conn: Connection[Any], limit: int, after: tuple[datetime, UUID] | None
) -> list[OrganisationRow]:
    """Organisations oldest first, `limit` at most, after the (created_at, id) cursor."""
    assert 0 < limit <= LIST_MAX_ROWS + 1  # one more than a page: is there a next one?
    if after is None:
        return all_rows(conn, OrganisationRow,
                        f"SELECT {_COLUMNS} FROM organisations ORDER BY created_at, id LIMIT %s",
                        (limit,))
    return all_rows(conn, OrganisationRow,
                    f"SELECT {_COLUMNS} FROM organisations WHERE (created_at, id) > (%s, %s)"
                    " ORDER BY created_at, id LIMIT %s",
                    (*after, limit))
