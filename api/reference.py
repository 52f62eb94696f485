"""The API's reference: what the OpenAPI document says beyond what Litestar reads from handlers.

Handlers read their query parameters by hand (for their own 422 messages), parse the ingest body
by hand (for speed) and authenticate in guards, so Litestar's generated document knows none of
it. This module owns what it adds, once, after the document is generated (`install`):

- QUERY: every query parameter of every route, declared once, keyed like api/permissions.py by
  (method, path template). A route's documented query parameters are also the only ones it
  accepts: `install` leaves their names in app.state, and api/input_rules.py answers any other
  name with a 422 naming it. A parameter a handler declares in its signature (Litestar's own
  way) is documented by Litestar, and so accepted, without an entry here.
- the bearer schemes (SECURITY_SCHEMES) and each route's security, by its path prefix;
- the problem+json answers (api/problems.py) each route can give, by what the route is;
- the body of POST /api/v1/events (INGEST_BODY): documented, never used to decode;
- the signature header of the Razorpay webhook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin

from api.idempotency import HEADER as IDEMPOTENCY_HEADER
from api.idempotency import IDEMPOTENCY_KEY_MAX_CHARS, IDEMPOTENT_METHODS
from api.ingest import REQUEST_EVENTS_MAX
from api.input_rules import ACCEPTED_QUERY_STATE
from api.invoices import ORDERS
from api.ledger import LEDGER_LIMIT_DEFAULT, LEDGER_LIMIT_MAX
from api.pagination import CURSOR_MAX_CHARS, DEFAULT_LIMIT, MAX_LIMIT
from api.problems import PROBLEM_JSON
from api.read_your_writes import LEDGER_POSITION_HEADER, POSITION_MAX_DIGITS
from api.usage import GROUP_BY_PARAM_MAX_CHARS
from api.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER
from domain.credit_note import CREDIT_NOTE_STATUSES
from domain.invoice import STATUSES
from domain.numbering import NUMBER_MAX_CHARS
from domain.payment import PAYMENT_STATUSES
from domain.usage import (
    EVENT_ID_MAX_CHARS,
    PROPERTIES_MAX_KEYS,
    PROPERTY_KEY_MAX_CHARS,
    PROPERTY_VALUE_MAX_CHARS,
)
from projections.webhook_endpoints import DELIVERY_STATUSES


@dataclass(frozen=True)
class Query:
    """One query parameter as the document states it (`schema` is JSON Schema)."""

    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False

    def as_openapi(self) -> dict[str, Any]:
        return {"name": self.name, "in": "query", "required": self.required,
                "description": self.description, "schema": self.schema}


# ---- query parameters ---------------------------------------------------------------------------

_UUID = {"type": "string", "format": "uuid"}
_MONTH = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$", "examples": ["2026-10"]}
LIMIT = Query("limit", f"Items per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}).",
              {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT})
CURSOR = Query("cursor", "The `next_cursor` of the previous page (opaque); absent: the first page.",
               {"type": "string", "maxLength": CURSOR_MAX_CHARS})
PAGE = (LIMIT, CURSOR)
_DATE_OR_TIME = ("A date (YYYY-MM-DD, in the organisation's timezone) or an RFC 3339 time with"
                 " offset")
USAGE = (
    Query("metric", "The meter's code; left out, every meter's total per period (then no group_by).",
          {"type": "string", "minLength": 1}),
    Query("granularity", "One row per month (default) or per day.",
          {"type": "string", "enum": ["month", "day"], "default": "month"}),
    Query("from", f"{_DATE_OR_TIME}; default: the start of the current month.", {"type": "string"}),
    Query("to", f"{_DATE_OR_TIME}, exclusive; default: the start of next month.", {"type": "string"}),
    Query("group_by", "Comma-separated property names among the meter's group_by.",
          {"type": "string", "maxLength": GROUP_BY_PARAM_MAX_CHARS}),
    LIMIT,
    Query("cursor", "The `next_cursor` of the previous page (opaque).",
          {"type": "string", "pattern": "^[0-9]{1,6}$"}),
)

A = "/admin/v1"
QUERY: dict[tuple[str, str], tuple[Query, ...]] = {
    ("GET", f"{A}/organisations"): PAGE,
    ("GET", f"{A}/organisations/{{org_id}}/projects"): PAGE,
    ("GET", f"{A}/organisations/{{org_id}}/usage"): (
        *USAGE, Query("project_id", "Only this project's usage.", _UUID)),
    ("GET", "/api/v1/usage"): USAGE,
    ("GET", f"{A}/plans"): PAGE,
    ("GET", f"{A}/invoices"): (
        *PAGE,
        Query("organisation_id", "Only this organisation's invoices.", _UUID),
        Query("status", "Only invoices in this status.", {"type": "string", "enum": list(STATUSES)}),
        Query("period", "Only invoices of this month (YYYY-MM).", _MONTH),
        Query("number", "Only the invoice with this number, e.g. INV/2627/000001 (or"
                        " INV-2627-000001, as the PDF's file name spells it).",
              {"type": "string", "minLength": 1, "maxLength": NUMBER_MAX_CHARS}),
        Query("order", "By creation time: oldest first (default) or newest first.",
              {"type": "string", "enum": list(ORDERS), "default": ORDERS[0]}),
    ),
    ("GET", f"{A}/invoices/{{invoice_id}}/document"): (
        Query("format", "html (default, inline) or pdf (an attachment named after the invoice).",
              {"type": "string", "enum": ["html", "pdf"], "default": "html"}),
    ),
    ("GET", f"{A}/payments"): (
        *PAGE,
        Query("invoice_id", "Only this invoice's payments.", _UUID),
        Query("organisation_id", "Only this organisation's payments.", _UUID),
        Query("status", "Only payments in this status.",
              {"type": "string", "enum": list(PAYMENT_STATUSES)}),
        Query("review", "Only payments that need (true) or do not need (false) a review.",
              {"type": "string", "enum": ["true", "false"]}),
    ),
    ("GET", f"{A}/credit-notes"): (
        *PAGE,
        Query("organisation_id", "Only this organisation's credit notes.", _UUID),
        Query("invoice_id", "Only the credit notes of this invoice.", _UUID),
        Query("status", "Only credit notes in this status (refund_failed: refunds to look at).",
              {"type": "string", "enum": list(CREDIT_NOTE_STATUSES)}),
    ),
    ("GET", f"{A}/credit-notes/{{credit_note_id}}/document"): (
        Query("format", "html (default, inline) or pdf (an attachment named after the note).",
              {"type": "string", "enum": ["html", "pdf"], "default": "html"}),
    ),
    ("GET", f"{A}/organisations/{{org_id}}/webhook-deliveries"): (
        *PAGE,
        Query("status", "Only deliveries in this status (dead: dead-lettered after 24 h of failures).",
              {"type": "string", "enum": list(DELIVERY_STATUSES)}),
        Query("endpoint_id", "Only this endpoint's deliveries.", _UUID),
    ),
    ("GET", f"{A}/invoice-runs"): (
        *PAGE,
        Query("period", "Only the runs of this month (YYYY-MM).", _MONTH),
    ),
    ("GET", f"{A}/ledger"): (
        Query("after", "Entries after this ledger position (default 0: from the start); the next "
              "page starts after the last line's position.",
              {"type": "string", "pattern": f"^[0-9]{{1,{POSITION_MAX_DIGITS}}}$", "default": "0"}),
        Query("limit", f"Entries in this response, 1 to {LEDGER_LIMIT_MAX}.",
              {"type": "integer", "minimum": 1, "maximum": LEDGER_LIMIT_MAX,
               "default": LEDGER_LIMIT_DEFAULT}),
    ),
    ("GET", f"{A}/audit-events"): (
        LIMIT,
        Query("cursor", "The `next_cursor` of the previous page (a ledger position).",
              {"type": "string", "pattern": f"^[0-9]{{1,{POSITION_MAX_DIGITS}}}$"}),
        Query("organisation_id", "Only what was done to this organisation.", _UUID),
        Query("actor_id", "Only what this token or key did.", _UUID),
        Query("action", "Only this action, e.g. organisation.created.", {"type": "string"}),
        Query("from", "From this RFC 3339 time with offset (inclusive).",
              {"type": "string", "format": "date-time"}),
        Query("to", "Up to this RFC 3339 time with offset (exclusive).",
              {"type": "string", "format": "date-time"}),
    ),
}

# ---- security -------------------------------------------------------------------------------------

ADMIN_TOKEN, API_KEY, METRICS_TOKEN = "adminToken", "apiKey", "metricsToken"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    ADMIN_TOKEN: {"type": "http", "scheme": "bearer", "bearerFormat": "bt_...",
                  "description": "An admin token (`Authorization: Bearer bt_...`): the owner's from"
                                 " BILLING_ADMIN_TOKEN, or one made by POST /admin/v1/tokens. Its"
                                 " role decides what it may do (api/permissions.py)."},
    API_KEY: {"type": "http", "scheme": "bearer", "bearerFormat": "bk_...",
              "description": "A project's API key (`Authorization: Bearer bk_...`), made by"
                             " POST /admin/v1/projects/{project_id}/api-keys."},
    METRICS_TOKEN: {"type": "http", "scheme": "bearer",
                    "description": "BILLING_METRICS_TOKEN; without it, /metrics answers this host"
                                   " only."},
}


def security_of(path: str) -> list[dict[str, list[str]]]:
    """Who may call a route, by its path: admin routes take an admin token, /api/ routes an API
    key; health and the (signed) webhook take none."""
    if path.startswith("/admin/"):
        return [{ADMIN_TOKEN: []}]
    if path.startswith("/api/"):
        return [{API_KEY: []}]
    if path == "/metrics":
        return [{METRICS_TOKEN: []}, {}]
    return []


# ---- error answers --------------------------------------------------------------------------------

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details: every error answer of this API (api/problems.py).",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "examples": ["https://billing.invalid/problems/422"]},
        "title": {"type": "string", "examples": ["Unprocessable Content"]},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array", "description": "422: every broken rule, each naming its field",
            "items": {"type": "object", "required": ["field", "message"], "properties": {
                "field": {"type": "string"},
                "message": {"type": "string"},
                "index": {"type": "integer", "description": "the event's place in a batch"}}},
        },
    },
}
_WHY = {
    "400": "The body is not valid JSON.",
    "401": "No credential, or an unknown, revoked or expired one.",
    "403": "The credential's role may not do this, or the client's address is not allowed.",
    "404": "No such resource (or not the caller's organisation's).",
    "409": "The resource's state does not allow this now.",
    "413": "The body is larger than 1 MiB.",
    "415": "The body is not JSON by its Content-Type.",
    "422": "The request is invalid (every broken rule listed in `errors`), or names a query"
           " parameter the route does not take; nothing was changed.",
    "429": "The API key's rate limit is spent; Retry-After says when to come back.",
    "502": "The payment gateway answered with an error, or with something that is not its"
           " API's answer; nothing was recorded.",
    "503": "A dependency (the ledger, a read model, the payment gateway) is not answering;"
           " Retry-After says when to try again.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again",
                                 "schema": {"type": "integer", "minimum": 0}}}
_ERROR_HEADERS: dict[str, dict[str, Any]] = {
    "401": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    "429": _RETRY_AFTER,
    "503": _RETRY_AFTER,
}
_HAS_BODY = ("post", "put", "patch")
_PATH_PARAM = re.compile(r"\{[^}]+\}")


# Error answers particular to a route (keyed like QUERY), beyond those of its kind.
EXTRA_ERRORS: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", f"{A}/invoices/{{invoice_id}}/payment-orders"): ("502",),
}


def errors_of(path: str, method: str) -> list[str]:
    """The error statuses a route can answer, by what it is."""
    codes = ["422", *EXTRA_ERRORS.get((method.upper(), path), ())]
    secured = path.startswith(("/admin/", "/api/"))
    if secured or path == "/metrics":
        codes += ["401", "403"]
    if _PATH_PARAM.search(path):
        codes.append("404")
    if method in _HAS_BODY:
        codes += ["400", "413", "415"]
        if path.startswith("/admin/"):
            codes.append("409")
    if method == "delete" and path.startswith("/admin/"):
        codes.append("409")
    if path.startswith("/api/"):
        codes.append("429")
    if secured:
        codes.append("503")
    return sorted(set(codes))


# ---- the ingest body -------------------------------------------------------------------------------

_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event_id", "metric"],
    "properties": {
        "event_id": {"type": "string", "minLength": 1, "maxLength": EVENT_ID_MAX_CHARS,
                     "description": "Unique per project: a resent event_id is a duplicate."},
        "metric": {"type": "string", "minLength": 1, "description": "A meter's code."},
        "timestamp": {"type": "string", "format": "date-time",
                      "description": "RFC 3339 with offset; default: when received."},
        "value": {"oneOf": [{"type": "number", "minimum": 0},
                            {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}],
                  "description": "Default 1; not sent when the meter takes it from properties."},
        "properties": {"type": "object", "maxProperties": PROPERTIES_MAX_KEYS,
                       "propertyNames": {"maxLength": PROPERTY_KEY_MAX_CHARS},
                       "additionalProperties": {"oneOf": [
                           {"type": "string", "maxLength": PROPERTY_VALUE_MAX_CHARS},
                           {"type": "number"}, {"type": "boolean"}]},
                       "description": "At most 4 KiB of JSON."},
    },
}
INGEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {"application/json": {"schema": {"oneOf": [
        {"$ref": "#/components/schemas/UsageEvent"},
        {"type": "object", "required": ["events"], "properties": {"events": {
            "type": "array", "minItems": 1, "maxItems": REQUEST_EVENTS_MAX,
            "items": {"$ref": "#/components/schemas/UsageEvent"}}}},
    ]}}},
}
WEBHOOK_BODY: dict[str, Any] = {
    "required": True,
    "description": "The event exactly as Razorpay sent it (the signature covers its bytes).",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


# ---- success answers a handler's return type cannot tell ---------------------------------------------

def _document_formats(responses: dict[str, Any]) -> None:
    ok = responses.setdefault("200", {"description": "The document"})
    ok["description"] = ("The invoice or credit note as HTML (format=html, inline) or PDF"
                         " (format=pdf, an attachment); Content-Disposition names the file, e.g."
                         " INV-2627-000001.pdf or CN-2627-000001.pdf")
    ok.setdefault("content", {})["application/pdf"] = {
        "schema": {"type": "string", "contentMediaType": "application/pdf"}}
    ok.setdefault("headers", {})["Content-Disposition"] = {
        "schema": {"type": "string"}, "description": "inline (html) or attachment (pdf); filename"}


def _order_already_made(responses: dict[str, Any]) -> None:
    if "201" in responses:
        responses.setdefault("200", {**responses["201"], "description": "An open order for the"
                                     " amount due was already recorded: that order, unchanged"})


SUCCESS: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("GET", f"{A}/invoices/{{invoice_id}}/document"): _document_formats,
    ("POST", f"{A}/invoices/{{invoice_id}}/payment-orders"): _order_already_made,
    ("GET", f"{A}/credit-notes/{{credit_note_id}}/document"): _document_formats,
}


# ---- putting it into the document ------------------------------------------------------------------

def _header(name: str, description: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "description": description,
            "schema": schema}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, method in lower case, operation) of every operation in the document."""
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                yield path, method, operation


def complete(document: dict[str, Any]) -> None:
    """Add what Litestar cannot know to its generated document (in place)."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["UsageEvent"] = _EVENT
    components["securitySchemes"] = SECURITY_SCHEMES
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, method, op in operations(document):
        params: list[dict[str, Any]] = op.setdefault("parameters", [])
        named = {(p.get("name"), p.get("in")) for p in params}
        for query in QUERY.get((method.upper(), path), ()):
            if (query.name, "query") not in named:
                params.append(query.as_openapi())
        if path.startswith("/admin/") and method.upper() in IDEMPOTENT_METHODS:
            params.append(_header(IDEMPOTENCY_HEADER.decode().title(),
                                  "Optional: a retry with the same key and body gets the first"
                                  " answer again, and changes nothing more.",
                                  {"type": "string", "minLength": 1,
                                   "maxLength": IDEMPOTENCY_KEY_MAX_CHARS,
                                   "pattern": "^[\\x20-\\x7e]+$"}))
        if method == "get" and path.startswith(("/admin/", "/api/")):
            params.append(_header(LEDGER_POSITION_HEADER,
                                  "Optional: wait until the read includes this ledger position (a"
                                  " write's X-Ledger-Position).",
                                  {"type": "string", "pattern": f"^[0-9]{{1,{POSITION_MAX_DIGITS}}}$"}))
        if path == "/webhooks/razorpay":
            params.append(_header(SIGNATURE_HEADER, "HMAC-SHA256 of the body with the webhook"
                                  " secret (hex).", {"type": "string"}, required=True))
            params.append(_header(EVENT_ID_HEADER, "Razorpay's event id (duplicates are"
                                  " recorded once).", {"type": "string"}))
            op["requestBody"] = WEBHOOK_BODY
        if path == "/api/v1/events" and method == "post":
            op["requestBody"] = INGEST_BODY
        if not params:
            del op["parameters"]
        op["security"] = security_of(path)
        responses: dict[str, Any] = op.setdefault("responses", {})
        if (method.upper(), path) in SUCCESS:
            SUCCESS[(method.upper(), path)](responses)
        codes = errors_of(path, method)
        if "400" not in codes:  # Litestar's own guess; this API answers bad parameters with 422
            responses.pop("400", None)
        for code in codes:
            responses[code] = {"description": _WHY[code], "content": problem}
            if code in _ERROR_HEADERS:
                responses[code]["headers"] = _ERROR_HEADERS[code]


def accepted_query(document: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """Per (METHOD, path template): the query parameters its operation documents."""
    return {
        (method.upper(), path): frozenset(p["name"] for p in op.get("parameters", ())
                                          if p.get("in") == "query")
        for path, method, op in operations(document)
    }


def install(app: Litestar) -> None:
    """Complete the app's OpenAPI document, then tell api/input_rules.py which query parameters
    each route accepts: the documented ones. Refuse to start if QUERY names a route the app does
    not have (renamed or removed: its parameters would silently stop being accepted)."""
    document = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    routes = {(method.upper(), path) for path, method, _ in operations(document)}
    stale = sorted(f"{m} {p}" for m, p in (set(QUERY) | set(SUCCESS) | set(EXTRA_ERRORS)) - routes)
    if stale:
        raise RuntimeError(f"api/reference.py declares parameters or answers of no route: {stale}")
    complete(document)
    app.state[ACCEPTED_QUERY_STATE] = accepted_query(document)
