"""Bearer credentials, checked one way: project API keys (ingestion) and admin tokens (/admin).

Both are `<kind>_<visible prefix>_<secret>` (the bootstrap owner token excepted: its prefix is a
slice of its hash). One path serves both: parse the header, look the record up by its prefix,
compare SHA-256 digests in constant time, then refuse a revoked or expired one. A wrong secret
for a known prefix costs what an unknown prefix costs (one lookup, then remembered), so the time
to a 401 does not tell which prefixes exist. A credential of the other kind (`bk_` on an admin
route, `bt_` on ingestion) costs what any unknown one costs; only its refusal says which kind
the route needs, read from the prefix that the credential's own format makes public.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from litestar.connection import ASGIConnection

from api.deps import ApiDeps
from api.problems import Unauthenticated
from domain.access import TOKEN_PREFIX, TOKEN_PREFIX_CHARS, Principal, bootstrap_token_id, token_hash
from domain.api_key import KEY_PREFIX, secret_hash, split_key
from domain.records import KeyRecord, TokenRecord

BEARER_PREFIX = "bearer "
TOKEN_MAX_CHARS = 512
WRONG_KIND_FOR_ADMIN = (f"a {KEY_PREFIX} API key was sent; admin routes need a {TOKEN_PREFIX} "
                        "admin token")
WRONG_KIND_FOR_INGEST = (f"a {TOKEN_PREFIX} admin token was sent; this route needs a {KEY_PREFIX} "
                         "project API key")


class Lapsing(Protocol):
    """What a credential's record says of its life."""

    @property
    def revoked(self) -> bool: ...

    @property
    def expires_at(self) -> datetime | None: ...


R_co = TypeVar("R_co", bound=Lapsing, covariant=True)
R = TypeVar("R", bound=Lapsing)


class CredentialLookup(Protocol[R_co]):
    """domain.ports.KeyLookup and TokenLookup alike."""

    async def find(self, prefix: str) -> R_co | None: ...

    async def confirm_refusal(self, prefix: str, attempt: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Presented:
    """A credential as sent: the prefix it is found by and the hex SHA-256 of the whole of it."""

    prefix: str
    digest: str


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    # Straight from the raw headers: litestar's Headers would copy them all, on the hot path.
    raw = next((v for k, v in connection.scope["headers"] if k == b"authorization"), b"")
    header = raw.decode("latin-1")
    if not header.lower().startswith(BEARER_PREFIX) or len(header) > TOKEN_MAX_CHARS:
        raise Unauthenticated("an Authorization: Bearer <token> header is required")
    return header[len(BEARER_PREFIX):].strip()


async def verify(
    lookup: CredentialLookup[R], presented: Presented | None, *,
    digest_of: Callable[[R], str], noun: str, clock: Callable[[], datetime],
) -> R | None:
    """The record the credential names, or None when it names none (malformed, unknown prefix,
    wrong secret). Unauthenticated for a revoked or expired one: the caller knew its secret."""
    if presented is None:
        return None
    record = await lookup.find(presented.prefix)
    if record is None:
        return None
    if not hmac.compare_digest(presented.digest, digest_of(record)):
        await lookup.confirm_refusal(presented.prefix, presented.digest)
        return None
    if record.revoked:
        raise Unauthenticated(f"this {noun} has been revoked")
    if record.expires_at is not None and record.expires_at <= clock():
        raise Unauthenticated(f"this {noun} has expired")
    return record


def _key_digest(record: KeyRecord) -> str:
    return record.secret_sha256


def _token_digest(record: TokenRecord) -> str:
    return record.token_sha256


async def authenticate_key(connection: ASGIConnection[Any, Any, Any, Any], deps: ApiDeps) -> KeyRecord:
    """The live project key of the request's bearer credential, or 401."""
    token = bearer_token(connection)
    parts = split_key(token)
    presented = Presented(parts[0], secret_hash(parts[1])) if parts else None
    record = await verify(deps.keys, presented, digest_of=_key_digest, noun="API key",
                          clock=deps.clock)
    if record is None:
        raise Unauthenticated(WRONG_KIND_FOR_INGEST if token.startswith(TOKEN_PREFIX)
                              else "unknown API key")
    return record


def _token_prefix(token: str) -> str:
    if token.startswith(TOKEN_PREFIX):
        return token[len(TOKEN_PREFIX):].partition("_")[0]
    return token_hash(token)[:TOKEN_PREFIX_CHARS]  # the bootstrap token has no visible prefix


async def authenticate_admin(connection: ASGIConnection[Any, Any, Any, Any], deps: ApiDeps) -> Principal:
    """The principal of the request's admin token, or 401."""
    token = bearer_token(connection)
    digest = token_hash(token)
    record = await verify(deps.tokens, Presented(_token_prefix(token), digest),
                          digest_of=_token_digest, noun="admin token", clock=deps.clock)
    if record is not None:
        return Principal(record.token_id, record.role, record.organisation_id,
                         record.organisation_allowed_ips if record.organisation_id else "")
    bootstrap = deps.admin_token_sha256
    if bootstrap is not None and hmac.compare_digest(bytes.fromhex(digest), bootstrap):
        # Recorded at start-up; until its projection arrives, the configured digest vouches.
        return Principal(bootstrap_token_id(token), "owner", None)
    # Decided only now: the lookups above cost the same whatever kind of credential was sent.
    raise Unauthenticated(WRONG_KIND_FOR_ADMIN if token.startswith(KEY_PREFIX)
                          else "unknown admin token")
