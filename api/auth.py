"""Admin bearer authentication. Secrets are compared as SHA-256 digests in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.deps import ApiDeps
from api.problems import Unauthenticated

BEARER_PREFIX = "bearer "
TOKEN_MAX_CHARS = 512


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization", "")
    if not header.lower().startswith(BEARER_PREFIX) or len(header) > TOKEN_MAX_CHARS:
        raise Unauthenticated("an Authorization: Bearer <token> header is required")
    return header[len(BEARER_PREFIX):].strip()


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    deps: ApiDeps = connection.app.state.deps
    token = bearer_token(connection)
    expected = deps.admin_token_sha256
    given = hashlib.sha256(token.encode()).digest()
    if expected is None or not hmac.compare_digest(given, expected):
        raise Unauthenticated("unknown or revoked admin token")
