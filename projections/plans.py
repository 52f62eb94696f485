"""The plans read model: every published plan version, and every subscription step.

`plan_versions` has one row per (code, version); `charges` is JSON with every decimal written
as a decimal string, so no price ever passes through a float. `subscriptions` has one row per
Started / PlanChanged event, in ledger order: the schedule that domain.subscription's
`plan_for_period` reads.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from domain.plan import Plan, StoredVersion
from domain.subscription import PublishedVersions, Subscription, SubscriptionEntry
from projections.base import ReadModel

NAME = "plans"
LIST_MAX_ROWS = 1000

DDL = (
    """CREATE TABLE IF NOT EXISTS plan_versions (
        code text NOT NULL,
        version integer NOT NULL,
        name text NOT NULL,
        currency text NOT NULL,
        base_fee numeric NOT NULL,
        minimum numeric NOT NULL,
        charges jsonb NOT NULL,
        published_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL,
        PRIMARY KEY (code, version)
    )""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        organisation_id uuid NOT NULL,
        plan_code text NOT NULL,
        effective_from timestamptz NOT NULL,
        recorded_at timestamptz NOT NULL,
        ledger_position bigint NOT NULL,
        PRIMARY KEY (organisation_id, ledger_position)
    )""",
)


def _version_published(cur: Cursor[Any], e: Plan.Published | Plan.VersionPublished, position: int) -> None:
    cur.execute(
        "INSERT INTO plan_versions (code, version, name, currency, base_fee, minimum, charges,"
        " published_at, ledger_position) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (e.code, e.version, e.name, e.currency, e.base_fee, e.minimum,
         Jsonb(msgspec.to_builtins(list(e.charges))), e.timestamp, position),
    )


def _subscription_step(cur: Cursor[Any], e: Subscription.Started | Subscription.PlanChanged,
                       position: int) -> None:
    cur.execute(
        "INSERT INTO subscriptions (organisation_id, plan_code, effective_from, recorded_at,"
        " ledger_position) VALUES (%s, %s, %s, %s, %s)",
        (e.organisation_id, e.plan_code, e.starts_at, e.timestamp, position),
    )


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("plan_versions", "subscriptions"),
    handlers={
        Plan.Published: _version_published,
        Plan.VersionPublished: _version_published,
        Subscription.Started: _subscription_step,
        Subscription.PlanChanged: _subscription_step,
    },
)

_VERSION_COLUMNS = "code, version, name, currency, base_fee, minimum, charges, published_at"
_STORED_FIELDS = ("code", "version", "name", "currency", "base_fee", "minimum", "charges",
                  "published_at")


def plan_latest(conn: Connection[Any], code: str) -> dict[str, Any] | None:
    """The newest version of a plan, or None for an unknown code."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s"
                    " ORDER BY version DESC LIMIT 1", (code,))
        return cur.fetchone()


def plan_version(conn: Connection[Any], code: str, version: int) -> dict[str, Any] | None:
    """One version of a plan (what an invoice pinned), or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s AND version = %s",
                    (code, version))
        return cur.fetchone()


def plan_versions(conn: Connection[Any], code: str) -> list[dict[str, Any]]:
    """Every version of a plan, oldest first (empty for an unknown code)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s"
                    " ORDER BY version LIMIT %s", (code, LIST_MAX_ROWS))
        return cur.fetchall()


def subscription_history(conn: Connection[Any], org_id: UUID) -> list[dict[str, Any]]:
    """An organisation's subscription steps in recorded (ledger) order: plan_code,
    effective_from, recorded_at. Empty when it never subscribed."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT plan_code, effective_from, recorded_at FROM subscriptions"
            " WHERE organisation_id = %s ORDER BY ledger_position",
            (org_id,),
        )
        return cur.fetchall()


def subscribed_organisations(conn: Connection[Any]) -> list[UUID]:
    """Every organisation that has (or had, or will have) a subscription, in id order.
    Whether a plan covers a given period is plan_for_period's question."""
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT organisation_id FROM subscriptions ORDER BY organisation_id")
        return [row[0] for row in cur.fetchall()]


# ---- rows -> domain values ------------------------------------------------------------------

def stored_version(row: dict[str, Any]) -> StoredVersion:
    """A plan_versions row as the domain's StoredVersion (domain.plan.to_version prices it)."""
    return msgspec.convert({k: row[k] for k in _STORED_FIELDS}, StoredVersion)


def history_entries(rows: list[dict[str, Any]]) -> list[SubscriptionEntry]:
    """subscription_history rows as the schedule plan_for_period reads."""
    return [SubscriptionEntry(r["plan_code"], r["effective_from"]) for r in rows]


def published_versions(rows: list[dict[str, Any]]) -> PublishedVersions:
    """plan_versions rows as the (version, published_at) pairs plan_for_period pins from."""
    return [(int(r["version"]), r["published_at"]) for r in rows]
