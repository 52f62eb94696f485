"""Admin authentication and authorisation: bearer token -> Principal -> the permission table.

Secrets are compared as SHA-256 digests in constant time. The acting principal, as an audit
Actor, is kept on the connection (actor_of): handlers pass it to every command, whose save
records it in an audit entry.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import anyio
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.client_ip import allowed, client_ip
from api.deps import ApiDeps
from api.permissions import Rule, rule_for
from api.problems import Forbidden, Unauthenticated
from domain.access import TOKEN_PREFIX, TOKEN_PREFIX_CHARS, Principal, bootstrap_token_id, token_hash
from domain.audit import Actor
from domain.errors import NotFound

if TYPE_CHECKING:
    from litestar.types import HTTPScope

BEARER_PREFIX = "bearer "
TOKEN_MAX_CHARS = 512
_KIND = {"PROJECT": "project", "API_KEY": "api_key", "INVOICE": "invoice"}


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    # Straight from the raw headers: litestar's Headers would copy them all, on the hot path.
    raw = next((v for k, v in connection.scope["headers"] if k == b"authorization"), b"")
    header = raw.decode("latin-1")
    if not header.lower().startswith(BEARER_PREFIX) or len(header) > TOKEN_MAX_CHARS:
        raise Unauthenticated("an Authorization: Bearer <token> header is required")
    return header[len(BEARER_PREFIX):].strip()


def _prefix(token: str) -> str:
    if token.startswith(TOKEN_PREFIX):
        return token[len(TOKEN_PREFIX):].partition("_")[0]
    return token_hash(token)[:TOKEN_PREFIX_CHARS]  # the bootstrap token has no visible prefix


async def authenticate_admin(connection: ASGIConnection[Any, Any, Any, Any], deps: ApiDeps) -> Principal:
    token = bearer_token(connection)
    digest = token_hash(token)
    record = await deps.tokens.find(_prefix(token))
    if record is not None and hmac.compare_digest(digest, record.token_sha256):
        if record.revoked:
            raise Unauthenticated("this admin token has been revoked")
        if record.expires_at is not None and record.expires_at <= deps.clock():
            raise Unauthenticated("this admin token has expired")
        return Principal(record.token_id, record.role, record.organisation_id,
                         record.organisation_allowed_ips if record.organisation_id else "")
    if record is not None:  # a known prefix, a wrong secret: as costly as an unknown prefix
        await deps.tokens.confirm_refusal(_prefix(token), digest)
    bootstrap = deps.admin_token_sha256
    if record is None and bootstrap is not None and hmac.compare_digest(
        hashlib.sha256(token.encode()).digest(), bootstrap
    ):
        # Recorded at start-up; until its projection arrives, the configured digest vouches.
        return Principal(bootstrap_token_id(token), "owner", None)
    raise Unauthenticated("unknown admin token")


async def _confine(rule: Rule, principal: Principal, connection: ASGIConnection[Any, Any, Any, Any],
                   deps: ApiDeps) -> None:
    """An organisation-scoped caller sees only its organisation: others' resources are 404."""
    if rule.scope == "GLOBAL":
        raise Forbidden(f"{principal.role} cannot do this: it needs a platform role")
    if rule.scope in ("ANY", "LIST") or rule.path_param is None:
        return
    raw = str(connection.path_params.get(rule.path_param, ""))
    try:
        ident = UUID(raw)
    except ValueError:
        return  # the handler answers 422 for a malformed id
    if rule.scope == "ORG":
        owner: UUID | None = ident
    else:
        owner = await anyio.to_thread.run_sync(deps.resolver.organisation_of, _KIND[rule.scope], ident)
    if owner != principal.organisation_id:
        raise NotFound(_KIND.get(rule.scope, "organisation"), ident)


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    deps: ApiDeps = connection.app.state.deps
    principal = await authenticate_admin(connection, deps)
    # Guards run on HTTP routes only: the scope is an HTTP one.
    scope = cast("HTTPScope", connection.scope)
    rule = rule_for(scope["method"], scope.get("path_template", ""))
    if rule is None:  # create_app refuses such routes; this is the belt to those braces
        raise Forbidden("this route has no permission rule")
    if rule.permission not in deps.role_permissions.get(principal.role, frozenset()):
        raise Forbidden(f"the {principal.role} role may not {rule.permission.replace(':', ' ')}")
    if principal.scoped:
        # The organisation's allow-list binds its own admins as it binds its keys; the
        # platform's operators are not the tenant's to fence.
        ip = client_ip(connection, deps.trusted_proxies)
        if not allowed(ip, principal.allowed_ips):
            raise Forbidden(f"requests from {ip} are not allowed by this organisation's allow-list")
        await _confine(rule, principal, connection, deps)
    connection.state.principal = principal
    connection.state.actor = Actor(principal.id, principal.role, principal.organisation_id,
                                   client_ip(connection, deps.trusted_proxies),
                                   str(connection.scope.get("state", {}).get("request_id", "")))


def actor_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Actor:
    """Who is acting in this admin request (set by admin_guard): the `actor` of its commands."""
    actor: Actor = connection.state.actor
    return actor


def scope_of(connection: ASGIConnection[Any, Any, Any, Any]) -> UUID | None:
    """The organisation an organisation-scoped caller is confined to (None: platform role)."""
    principal: Principal = connection.state.principal
    return principal.organisation_id
