"""Admin Idempotency-Keys in Postgres (docs/IDEMPOTENCY.md): one row per (principal, key).

A request claims its key before it runs (INSERT ... ON CONFLICT, one statement, so two racing
retries cannot both claim it) and completes it after, with the answer its retries replay. A
claim carries a lease: a holder that died leaves a claim that a later retry takes over once the
lease has run out; whether the dead holder's command had committed is then told by the ledger
(the request's derived audit entry, domain/audit.py), never by this table.

Rows live for the retention and are purged lazily, a bounded batch at a time, by the claims.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from adapters.ledger import LedgerStore
from domain.audit import Recorded
from domain.errors import Unavailable
from domain.records import Claim, StoredResponse

TABLE = "idempotency_keys"
IDEMPOTENCY_RETENTION_S = 24 * 3600  # docs/API.md: a key is kept at least 24 h
IDEMPOTENCY_LEASE_S = 60  # a claim's holder is presumed dead after this long without an answer
PURGE_INTERVAL_S = 60.0  # a process purges expired keys at most this often
PURGE_BATCH_ROWS = 1000  # rows one purge deletes (a purge never holds a long transaction)

DDL = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        principal_id uuid NOT NULL,
        key text NOT NULL,
        fingerprint bytea NOT NULL,
        claim uuid,
        lease_until timestamptz,
        status_code integer,
        headers jsonb,
        body bytea,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (principal_id, key))""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (expires_at)",
)

# A new key, or one whose earlier use expired, is claimed afresh; an unexpired claim whose
# lease ran out is taken over, but only by the same request (same fingerprint).
_CLAIM = f"""
INSERT INTO {TABLE} AS k (principal_id, key, fingerprint, claim, lease_until, created_at, expires_at)
VALUES (%(p)s, %(k)s, %(f)s, %(c)s, now() + make_interval(secs => %(lease)s), now(),
        now() + make_interval(secs => %(keep)s))
ON CONFLICT (principal_id, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, claim = EXCLUDED.claim, lease_until = EXCLUDED.lease_until,
    status_code = NULL, headers = NULL, body = NULL,
    created_at = CASE WHEN k.expires_at <= now() THEN EXCLUDED.created_at ELSE k.created_at END,
    expires_at = CASE WHEN k.expires_at <= now() THEN EXCLUDED.expires_at ELSE k.expires_at END
WHERE k.expires_at <= now()
   OR (k.status_code IS NULL AND k.lease_until <= now() AND k.fingerprint = EXCLUDED.fingerprint)
RETURNING (xmax <> 0 AND k.created_at < now()) AS taken_over, k.created_at
"""
_FIND = f"SELECT fingerprint, status_code, headers, body FROM {TABLE} WHERE principal_id = %s AND key = %s"
_COMPLETE = f"""
UPDATE {TABLE} SET status_code = %s, headers = %s, body = %s, claim = NULL, lease_until = NULL
WHERE principal_id = %s AND key = %s AND claim = %s"""
_RELEASE = f"DELETE FROM {TABLE} WHERE principal_id = %s AND key = %s AND claim = %s AND status_code IS NULL"
_PURGE = f"""
DELETE FROM {TABLE} WHERE ctid IN (
    SELECT ctid FROM {TABLE} WHERE expires_at <= now() LIMIT {PURGE_BATCH_ROWS})"""


class PgIdempotencyStore:
    """domain.ports.IdempotencyStore on the read pool's Postgres, with the ledger for recovery.

    Postgres errors become Unavailable (503 with Retry-After): a keyed request is never run
    without its claim."""

    def __init__(self, pool: ConnectionPool, ledger: LedgerStore) -> None:
        self._pool = pool
        self._ledger = ledger
        self._next_purge = 0.0
        self._purge_lock = threading.Lock()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as e:
            raise Unavailable(f"idempotency keys unavailable: {type(e).__name__}") from e

    def claim(self, principal_id: UUID, key: str, fingerprint: bytes) -> Claim:
        self._maybe_purge()
        token = uuid4()
        with self._connection() as conn:
            row = conn.execute(_CLAIM, {"p": principal_id, "k": key, "f": fingerprint, "c": token,
                                        "lease": IDEMPOTENCY_LEASE_S,
                                        "keep": IDEMPOTENCY_RETENTION_S}).fetchone()
            if row is not None:
                return Claim("claimed", token, taken_over=bool(row[0]), claimed_at=row[1])
            found = conn.execute(_FIND, (principal_id, key)).fetchone()
        if found is None:  # purged between the two statements: a fresh key, claim it again
            return self.claim(principal_id, key, fingerprint)
        stored_fingerprint, status, headers, body = found
        if bytes(stored_fingerprint) != fingerprint:
            return Claim("mismatch")
        if status is None:
            return Claim("busy")
        return Claim("replay", response=StoredResponse(
            int(status), [(str(n), str(v)) for n, v in headers or []], bytes(body or b"")))

    def complete(self, principal_id: UUID, key: str, token: UUID, response: StoredResponse) -> bool:
        headers: Any = Jsonb([list(h) for h in response.headers])
        with self._connection() as conn:
            done = conn.execute(_COMPLETE, (response.status, headers, response.body, principal_id,
                                            key, token))
            return done.rowcount == 1

    def release(self, principal_id: UUID, key: str, token: UUID) -> None:
        with self._connection() as conn:
            conn.execute(_RELEASE, (principal_id, key, token))

    def recorded(self, entry_id: UUID) -> Recorded | None:
        return self._ledger.recorded(entry_id)

    def purge_expired(self) -> int:
        """Delete up to PURGE_BATCH_ROWS expired keys; return how many went."""
        with self._connection() as conn:
            return conn.execute(_PURGE).rowcount

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now < self._next_purge or not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._next_purge = now + PURGE_INTERVAL_S
            with contextlib.suppress(Unavailable):  # the claim that follows will say so
                self.purge_expired()
        finally:
            self._purge_lock.release()
