"""The plans read model: every published plan version, and every subscription step.

`plan_versions` has one row per (code, version); `charges` is JSON with every decimal written
as a decimal string, so no price ever passes through a float. `subscriptions` has one row per
Started / PlanChanged event, in ledger order: the schedule that domain.subscription's
`plan_for_period` reads; a StartMoved rewrites the first row's `effective_from`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from psycopg import Connection, Cursor
from psycopg.types.json import Jsonb

from domain.plan import Plan, StoredVersion
from domain.subscription import PublishedVersions, Subscription, SubscriptionEntry
from projections.base import ReadModel, all_rows, one_row, require_row

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


def _start_moved(cur: Cursor[Any], e: Subscription.StartMoved, position: int) -> None:
    # The correction rewrites the first step (the one Started recorded), as the aggregate does.
    cur.execute(
        "UPDATE subscriptions SET effective_from = %s WHERE organisation_id = %s AND"
        " ledger_position = (SELECT min(ledger_position) FROM subscriptions"
        " WHERE organisation_id = %s)",
        (e.starts_at, e.organisation_id, e.organisation_id),
    )
    require_row(cur, "subscription of organisation", e.organisation_id)


READ_MODEL = ReadModel(
    name=NAME,
    ddl=DDL,
    tables=("plan_versions", "subscriptions"),
    handlers={
        Plan.Published: _version_published,
        Plan.VersionPublished: _version_published,
        Subscription.Started: _subscription_step,
        Subscription.PlanChanged: _subscription_step,
        Subscription.StartMoved: _start_moved,
    },
)



class PlanVersionRow(StoredVersion, frozen=True):
    """One published plan version: the fields the ledger records (prices in rupees, exact:
    numeric and decimal strings), as the read model holds them."""


class SubscriptionRow(msgspec.Struct, frozen=True):
    """One subscription step: the plan in force from `effective_from`."""

    plan_code: str
    effective_from: datetime
    recorded_at: datetime


_VERSION_COLUMNS = "code, version, name, currency, base_fee, minimum, charges, published_at"


def plan_latest(conn: Connection[Any], code: str) -> PlanVersionRow | None:
    """The newest version of a plan, or None for an unknown code."""
    return one_row(conn, PlanVersionRow,
                   f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s"
                   " ORDER BY version DESC LIMIT 1", (code,))


def plan_version(conn: Connection[Any], code: str, version: int) -> PlanVersionRow | None:
    """One version of a plan (what an invoice pinned), or None."""
    return one_row(conn, PlanVersionRow,
                   f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s AND version = %s",
                   (code, version))


def plan_versions(conn: Connection[Any], code: str) -> list[PlanVersionRow]:
    """Every version of a plan, oldest first (empty for an unknown code)."""
    return all_rows(conn, PlanVersionRow,
                    f"SELECT {_VERSION_COLUMNS} FROM plan_versions WHERE code = %s"
                    " ORDER BY version LIMIT %s", (code, LIST_MAX_ROWS))


class PlanSummaryRow(msgspec.Struct, frozen=True):
    """A plan as listed: its latest version's code, name and currency."""

    code: str
    version: int  # the latest
    name: str
    currency: str
    published_at: datetime  # when the latest version was published


def plans_page(conn: Connection[Any], limit: int, after_code: str | None) -> list[PlanSummaryRow]:
    """Every plan's latest version, by code, `limit` at most, after `after_code`."""
    assert 0 < limit <= LIST_MAX_ROWS + 1  # one more than a page: is there a next one?
    return all_rows(conn, PlanSummaryRow,
                    "SELECT DISTINCT ON (code) code, version, name, currency, published_at"
                    " FROM plan_versions WHERE %(after)s::text IS NULL OR code > %(after)s"
                    " ORDER BY code, version DESC LIMIT %(limit)s",
                    {"after": after_code, "limit": limit})


def subscription_history(conn: Connection[Any], org_id: UUID) -> list[SubscriptionRow]:
    """An organisation's subscription steps in recorded (ledger) order. Empty when it never
    subscribed."""
    return all_rows(conn, SubscriptionRow,
                    "SELECT plan_code, effective_from, recorded_at FROM subscriptions"
                    " WHERE organisation_id = %s ORDER BY ledger_position", (org_id,))


def subscribed_organisations(conn: Connection[Any]) -> list[UUID]:
    """Every organisation that has (or had, or will have) a subscription, in id order.
    Whether a plan covers a given period is plan_for_period's question."""
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT organisation_id FROM subscriptions ORDER BY organisation_id")
        return [row[0] for row in cur.fetchall()]


def subscribed_page(conn: Connection[Any], after: UUID | None, limit: int) -> list[UUID]:
    """subscribed_organisations a page at a time: the next `limit` ids after `after`, in id
    order (a run over many organisations never holds all their ids)."""
    with conn.cursor() as cur:
        cur.execute("SELECT DISTINCT organisation_id FROM subscriptions"
                    " WHERE %(after)s::uuid IS NULL OR organisation_id > %(after)s"
                    " ORDER BY organisation_id LIMIT %(limit)s", {"after": after, "limit": limit})
        return [row[0] for row in cur.fetchall()]


def subscribed_count(conn: Connection[Any]) -> int:
    row = conn.execute("SELECT count(DISTINCT organisation_id) FROM subscriptions").fetchone()
    return int(row[0]) if row else 0


def subscription_histories(conn: Connection[Any], org_ids: Sequence[UUID]
                           ) -> dict[UUID, list[SubscriptionRow]]:
    """subscription_history of each of `org_ids` in one query (absent: never subscribed)."""
    out: dict[UUID, list[SubscriptionRow]] = {}
    with conn.cursor() as cur:
        cur.execute("SELECT organisation_id, plan_code, effective_from, recorded_at"
                    " FROM subscriptions WHERE organisation_id = ANY(%b::uuid[])"
                    " ORDER BY organisation_id, ledger_position", (list(org_ids),))
        for org_id, code, effective_from, recorded_at in cur.fetchall():
            out.setdefault(org_id, []).append(SubscriptionRow(code, effective_from, recorded_at))
    return out


# ---- rows -> domain values ------------------------------------------------------------------

def stored_version(row: PlanVersionRow) -> StoredVersion:
    """A plan_versions row as the domain's StoredVersion (domain.plan.to_version prices it)."""
    return StoredVersion(**msgspec.structs.asdict(row))


def history_entries(rows: Sequence[SubscriptionRow]) -> list[SubscriptionEntry]:
    """subscription_history rows as the schedule plan_for_period reads."""
    return [SubscriptionEntry(r.plan_code, r.effective_from) for r in rows]


def published_versions(rows: Sequence[PlanVersionRow]) -> PublishedVersions:
    """plan_versions rows as the (version, published_at) pairs plan_for_period pins from."""
    return [(r.version, r.published_at) for r in rows]
