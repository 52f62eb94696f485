"""Every error the API answers is RFC 9457 problem+json, mapped here and nowhere else."""

from __future__ import annotations

import logging
import re
from typing import Any
from uuid import UUID

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException

from domain.errors import (
    Conflict,
    FieldError,
    GatewayFailed,
    NotFound,
    Unavailable,
    ValidationFailed,
)

log = logging.getLogger("billing.api")

PROBLEM_JSON = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class Unauthenticated(Exception):
    """No, unknown, revoked or expired credential (401)."""


class Forbidden(Exception):
    """Authenticated, but not allowed (403)."""


class TooManyRequests(Exception):
    """The key's rate limit is spent (429); headers say when to come back."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        super().__init__("rate limit exceeded for this API key; retry after the Retry-After delay")


class BadRequest(Exception):
    """The body is not JSON at all (400)."""


def problem_body(status: int, detail: str, errors: list[FieldError] | None = None) -> dict[str, Any]:
    """The RFC 9457 document every error answer carries."""
    body: dict[str, Any] = {
        "type": f"https://billing.invalid/problems/{status}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [
            {"field": e.field, "message": e.message}
            | ({"index": e.index} if e.index is not None else {})
            for e in errors
        ]
    return body


def problem(
    status: int,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(problem_body(status, detail, errors)),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers or {},
    )


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED = re.compile(r"(?:missing required field|unknown field) `([^`]+)`")


# What each id in a path names, for the 422 a malformed one gets.
PATH_ID_NOUNS = {"org_id": "organisation", "project_id": "project", "key_id": "api key",
                 "token_id": "token", "invoice_id": "invoice", "payment_id": "payment"}


def malformed_id(what: str) -> ValidationFailed:
    return ValidationFailed([FieldError("id", f"{what} id must be a UUID")])


def parse_id(raw: str, what: str) -> UUID:
    """An id sent in a query: a UUID, or 422 naming `what`."""
    try:
        return UUID(raw)
    except ValueError:
        raise malformed_id(what) from None


def _malformed_path_id(request: Request[Any, Any, Any], exc: Exception) -> ValidationFailed | None:
    """Litestar's router answers 404 when a {name:uuid} segment of a path that matches a route is
    not a UUID (it cannot parse it: a ValueError). The API answers a malformed id with 422 naming
    it, as for an id in a query: find the route and the segment."""
    if not isinstance(exc, NotFoundException) or not isinstance(exc.__cause__, ValueError):
        return None
    segments = request.scope["path"].rstrip("/").split("/")
    for route in request.app.routes:
        names = route.path_format.rstrip("/").split("/")
        if len(names) != len(segments):
            continue
        bad = [name[1:-1] for name, segment in zip(names, segments, strict=True)
               if name.startswith("{") and name[1:-1] in PATH_ID_NOUNS and not _is_uuid(segment)]
        fixed = all(name == segment for name, segment in zip(names, segments, strict=True)
                    if not name.startswith("{"))
        if fixed and bad:
            return malformed_id(PATH_ID_NOUNS[bad[0]])
    return None


def _is_uuid(raw: str) -> bool:
    try:
        UUID(raw)
    except ValueError:
        return False
    return True


def field_error(message: str, index: int | None = None) -> FieldError:
    """Turn a msgspec validation message into a field error the client can act on."""
    at = _AT.search(message)
    path = at.group(1) if at else ""
    text = _AT.sub("", message)
    named = _NAMED.search(text)
    name = ".".join(p for p in (path, named.group(1) if named else "") if p) or "body"
    return FieldError(name, text, index)


_REFUSAL_STATUS = {Unauthenticated: "401", Forbidden: "403", TooManyRequests: "429"}


def _count_refusal(request: Request[Any, Any, Any], exc: Exception) -> None:
    """Counted and logged; the log names the reason, never the credential."""
    status = _REFUSAL_STATUS[type(exc)]
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.auth_failures.labels(status).inc()
    log.warning("refused", extra={"status": int(status), "reason": str(exc),
                                  "path": request.url.path,
                                  "client": request.client.host if request.client else "",
                                  "request_id": request.scope.get("state", {}).get("request_id")})


def _validation_errors(exc: ValidationException) -> list[FieldError]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    errors = []
    for item in extra:
        if isinstance(item, dict):
            parsed = field_error(str(item.get("message", "invalid")))
            key = str(item.get("key") or "body")
            if parsed.field == "body" and key not in ("data", "body"):
                parsed = FieldError(key, parsed.message)
            errors.append(parsed)
    return errors or [field_error(str(exc.detail))]


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The one mapping from exceptions to HTTP."""
    if isinstance(exc, (Unauthenticated, Forbidden, TooManyRequests)):
        _count_refusal(request, exc)
    exc = _malformed_path_id(request, exc) or exc
    if isinstance(exc, ValidationFailed):
        return problem(422, "the request is invalid; nothing was changed", exc.errors)
    if isinstance(exc, NotFound):
        return problem(404, str(exc))
    if isinstance(exc, Conflict):
        return problem(409, str(exc))
    if isinstance(exc, Unavailable):  # GatewayUnavailable and PaymentsNotConfigured among them
        return problem(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, GatewayFailed):
        return problem(502, str(exc))
    if isinstance(exc, Unauthenticated):
        return problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, Forbidden):
        return problem(403, str(exc))
    if isinstance(exc, TooManyRequests):
        return problem(429, str(exc), headers=exc.headers)
    if isinstance(exc, BadRequest):
        return problem(400, str(exc))
    if isinstance(exc, ValidationException):
        detail = str(exc.detail)
        if "malformed" in detail.lower() or "decode" in detail.lower():
            return problem(400, "the body is not valid JSON")
        return problem(422, "the request is invalid; nothing was changed", _validation_errors(exc))
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal error; it has been logged")


PATH_ID_NOUNS["credit_note_id"] = "credit note"  # credit notes (api/credit_notes.py)
# Tenant webhooks (api/webhook_endpoints.py): their path ids, for the 422 a malformed one gets.
PATH_ID_NOUNS.update({"endpoint_id": "webhook endpoint", "delivery_id": "webhook delivery"})
