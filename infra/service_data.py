"""Whether a database holds the service's ledger, asked before an operator command opens it:
opening creates every table, so a command pointed at the wrong database (or schema) would
otherwise make a second, empty ledger there and report it healthy. Only the service's roles
(`billing serve`, `make run`) create a ledger."""

from __future__ import annotations

from urllib.parse import urlparse

import psycopg
from psycopg import sql

from adapters.ledger import LEDGER_NAME

LEDGER_CHECK_CONNECT_TIMEOUT_S = 5


def where(database_url: str) -> str:
    """The database of `database_url`, for a message: host, port and name, never a password."""
    url = urlparse(database_url)
    return f"{url.hostname or '127.0.0.1'}:{url.port or 5432}/{(url.path or '/').lstrip('/')}"


def missing_ledger(database_url: str, schema: str) -> str | None:
    """Why `schema` of the database has no ledger to work on (None when it has one): the
    database cannot be reached, or the service never ran on it."""
    table = sql.Identifier(schema, f"{LEDGER_NAME}_events").as_string(None)
    try:
        with psycopg.connect(database_url, connect_timeout=LEDGER_CHECK_CONNECT_TIMEOUT_S) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    except psycopg.Error as e:
        return f"cannot reach the database at {where(database_url)}: {str(e).strip()}"
    if row and row[0]:
        return None
    return (f"no billing ledger in schema {schema!r} of {where(database_url)}: the service has "
            "never run on this database. Start it once (`make run`, or `billing serve`), or set "
            "DATABASE_URL (and BILLING_PG_SCHEMA) to the service's.")
