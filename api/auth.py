"""Admin authorisation: the admin token's Principal (api/credentials.py) -> the permission table.

Secrets are compared as SHA-256 digests in constant time. The acting principal, as an audit
Actor, is kept on the connection (actor_of) and injected into handlers as `actor` (api/app.py):
handlers pass it to every command, whose save records it in an audit entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import anyio
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import SkipValidation

from api.client_ip import allowed, client_ip
from api.credentials import authenticate_admin
from api.deps import ApiDeps
from api.permissions import Rule, rule_for
from api.problems import Forbidden
from domain.access import Principal
from domain.audit import Actor
from domain.errors import NotFound

if TYPE_CHECKING:
    from litestar.types import HTTPScope

_KIND = {"PROJECT": "project", "API_KEY": "api_key", "INVOICE": "invoice", "PAYMENT": "payment"}


async def _confine(rule: Rule, principal: Principal, connection: ASGIConnection[Any, Any, Any, Any],
                   deps: ApiDeps) -> None:
    """An organisation-scoped caller sees only its organisation: others' resources are 404."""
    if rule.scope == "GLOBAL":
        raise Forbidden(f"{principal.role} cannot do this: it needs a platform role")
    if rule.scope in ("ANY", "LIST") or rule.path_param is None:
        return
    ident = connection.path_params[rule.path_param]  # a UUID: the route's {name:uuid} parsed it
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


def provide_actor(request: Request[Any, Any, Any]) -> Actor:
    """The `actor` dependency of admin handlers (api/app.py provides it)."""
    return actor_of(request)


# What an admin handler declares to be given the acting principal. Not validated: admin_guard
# built it from the authenticated token, it is not input.
Acting = SkipValidation[Actor]


def scope_of(connection: ASGIConnection[Any, Any, Any, Any]) -> UUID | None:
    """The organisation an organisation-scoped caller is confined to (None: platform role)."""
    principal: Principal = connection.state.principal
    return principal.organisation_id
