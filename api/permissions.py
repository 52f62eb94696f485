"""Who may do what: one table decides every admin route (API.md, Authentication).

A rule names the permission a route needs and how an organisation-scoped caller is confined:
- GLOBAL: platform-wide commands; organisation-scoped callers get 403.
- ANY: platform-wide reads (meters, plans) that every role with the permission may see.
- ORG: the organisation in the path must be the caller's (else 404, as if it did not exist).
- PROJECT / API_KEY / INVOICE / PAYMENT: the resource's organisation must be the caller's (else 404).
- LIST: the handler narrows the list to the caller's organisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["GLOBAL", "ANY", "ORG", "PROJECT", "API_KEY", "INVOICE", "PAYMENT", "LIST"]


@dataclass(frozen=True)
class Rule:
    permission: str
    scope: Scope
    path_param: str | None = None


A = "/admin/v1"
RULES: dict[tuple[str, str], Rule] = {
    ("POST", f"{A}/tokens"): Rule("tokens:write", "GLOBAL"),
    ("DELETE", f"{A}/tokens/{{token_id}}"): Rule("tokens:write", "GLOBAL"),
    ("POST", f"{A}/organisations"): Rule("orgs:create", "GLOBAL"),
    ("GET", f"{A}/organisations"): Rule("orgs:read", "LIST"),
    ("GET", f"{A}/organisations/{{org_id}}"): Rule("orgs:read", "ORG", "org_id"),
    ("PATCH", f"{A}/organisations/{{org_id}}"): Rule("orgs:write", "ORG", "org_id"),
    ("POST", f"{A}/organisations/{{org_id}}/projects"): Rule("projects:write", "ORG", "org_id"),
    ("GET", f"{A}/organisations/{{org_id}}/projects"): Rule("projects:read", "ORG", "org_id"),
    ("GET", f"{A}/organisations/{{org_id}}/usage"): Rule("usage:read", "ORG", "org_id"),
    ("PUT", f"{A}/organisations/{{org_id}}/subscription"): Rule("billing:write", "GLOBAL"),
    ("GET", f"{A}/organisations/{{org_id}}/subscription"): Rule("billing:read", "ORG", "org_id"),
    ("GET", f"{A}/organisations/{{org_id}}/balance"): Rule("invoices:read", "ORG", "org_id"),
    ("GET", f"{A}/projects/{{project_id}}"): Rule("projects:read", "PROJECT", "project_id"),
    ("POST", f"{A}/projects/{{project_id}}/api-keys"): Rule("keys:write", "PROJECT", "project_id"),
    ("GET", f"{A}/projects/{{project_id}}/api-keys"): Rule("keys:read", "PROJECT", "project_id"),
    ("DELETE", f"{A}/api-keys/{{key_id}}"): Rule("keys:write", "API_KEY", "key_id"),
    ("POST", f"{A}/api-keys/{{key_id}}/rotate"): Rule("keys:write", "API_KEY", "key_id"),
    ("POST", f"{A}/meters"): Rule("catalogue:write", "GLOBAL"),
    ("GET", f"{A}/meters"): Rule("catalogue:read", "ANY"),
    ("GET", f"{A}/meters/{{code}}"): Rule("catalogue:read", "ANY"),
    ("POST", f"{A}/plans"): Rule("catalogue:write", "GLOBAL"),
    ("GET", f"{A}/plans"): Rule("catalogue:read", "ANY"),
    ("GET", f"{A}/plans/{{code}}"): Rule("catalogue:read", "ANY"),
    ("GET", f"{A}/invoices"): Rule("invoices:read", "LIST"),
    ("GET", f"{A}/invoices/{{invoice_id}}"): Rule("invoices:read", "INVOICE", "invoice_id"),
    ("GET", f"{A}/invoices/{{invoice_id}}/document"): Rule("invoices:read", "INVOICE", "invoice_id"),
    ("POST", f"{A}/invoices/{{invoice_id}}/finalize"): Rule("invoices:write", "GLOBAL"),
    ("POST", f"{A}/invoices/{{invoice_id}}/void"): Rule("invoices:write", "GLOBAL"),
    ("POST", f"{A}/invoices/{{invoice_id}}/payment-orders"): Rule("invoices:write", "GLOBAL"),
    ("POST", f"{A}/invoices/{{invoice_id}}/payments"): Rule("invoices:write", "GLOBAL"),
    ("POST", f"{A}/invoice-runs"): Rule("invoices:write", "GLOBAL"),
    ("GET", f"{A}/invoice-runs"): Rule("invoices:read", "GLOBAL"),
    ("GET", f"{A}/invoice-runs/{{run_id}}"): Rule("invoices:read", "GLOBAL"),
    ("GET", f"{A}/payments"): Rule("invoices:read", "LIST"),
    ("GET", f"{A}/payments/{{payment_id}}"): Rule("invoices:read", "PAYMENT", "payment_id"),
    ("GET", f"{A}/audit-events"): Rule("audit:read", "LIST"),
    ("POST", f"{A}/invoices/{{invoice_id}}/redraft"): Rule("invoices:write", "GLOBAL"),
    # Credit notes: a scoped caller's reads are confined by the handlers (another's is a 404).
    ("POST", f"{A}/invoices/{{invoice_id}}/credit-notes"): Rule("invoices:write", "GLOBAL"),
    ("POST", f"{A}/credit-notes/{{credit_note_id}}/retry-refund"): Rule("invoices:write", "GLOBAL"),
    ("GET", f"{A}/credit-notes"): Rule("invoices:read", "LIST"),
    ("GET", f"{A}/credit-notes/{{credit_note_id}}"): Rule("invoices:read", "LIST"),
    ("GET", f"{A}/credit-notes/{{credit_note_id}}/document"): Rule("invoices:read", "LIST"),
    ("GET", f"{A}/ledger"): Rule("ledger:read", "GLOBAL"),
    ("POST", f"{A}/reconciliations"): Rule("reconciliations:run", "GLOBAL"),
    ("GET", f"{A}/reconciliations"): Rule("reconciliations:read", "GLOBAL"),
    ("GET", f"{A}/reconciliations/{{reconciliation_id}}"): Rule("reconciliations:read", "GLOBAL"),
}

_READ = frozenset({"orgs:read", "projects:read", "keys:read", "catalogue:read", "billing:read",
                   "usage:read", "invoices:read"})
_WRITE = frozenset({"orgs:create", "orgs:write", "projects:write", "keys:write", "catalogue:write",
                    "billing:write", "invoices:write"})
ALL = frozenset(r.permission for r in RULES.values())

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "owner": ALL,
    "billing_admin": _READ | _WRITE | {"audit:read"},
    "support": _READ,
    "auditor": _READ | {"audit:read"},
    "org_admin": _READ | {"orgs:write", "projects:write", "keys:write", "audit:read"},
    "org_viewer": _READ,
}

# Reconciliation is the auditors' (and the owner's, who has ALL): a replay of the whole ledger.
ROLE_PERMISSIONS["auditor"] = ROLE_PERMISSIONS["auditor"] | {"reconciliations:run",
                                                             "reconciliations:read"}

# The ledger itself (GET /admin/v1/ledger, docs/AUDIT.md): auditors and owners only.
ROLE_PERMISSIONS["auditor"] = ROLE_PERMISSIONS["auditor"] | {"ledger:read"}


def rule_for(method: str, path_template: str) -> Rule | None:
    """The rule of a route, by its path template as Litestar routes it ({name}, no types)."""
    return RULES.get((method, path_template.rstrip("/") or "/"))


# Tenant webhooks (docs/WEBHOOKS.md): an organisation's own org_admin, or a platform role, manages
# its endpoints and re-sends deliveries; every role that reads the organisation sees them.
_WEBHOOK_READ, _WEBHOOK_WRITE = "webhooks:read", "webhooks:write"
_ORG_PATH = f"{A}/organisations/{{org_id}}"
RULES.update({
    ("POST", f"{_ORG_PATH}/webhook-endpoints"): Rule(_WEBHOOK_WRITE, "ORG", "org_id"),
    ("GET", f"{_ORG_PATH}/webhook-endpoints"): Rule(_WEBHOOK_READ, "ORG", "org_id"),
    ("DELETE", f"{_ORG_PATH}/webhook-endpoints/{{endpoint_id}}"): Rule(_WEBHOOK_WRITE, "ORG",
                                                                      "org_id"),
    ("GET", f"{_ORG_PATH}/webhook-deliveries"): Rule(_WEBHOOK_READ, "ORG", "org_id"),
    ("POST", f"{_ORG_PATH}/webhook-deliveries/{{delivery_id}}/resend"): Rule(_WEBHOOK_WRITE, "ORG",
                                                                            "org_id"),
})
ALL = ALL | {_WEBHOOK_READ, _WEBHOOK_WRITE}
for _role, _granted in {"owner": {_WEBHOOK_READ, _WEBHOOK_WRITE},
                        "billing_admin": {_WEBHOOK_READ, _WEBHOOK_WRITE},
                        "org_admin": {_WEBHOOK_READ, _WEBHOOK_WRITE},
                        "support": {_WEBHOOK_READ}, "auditor": {_WEBHOOK_READ},
                        "org_viewer": {_WEBHOOK_READ}}.items():
    ROLE_PERMISSIONS[_role] = ROLE_PERMISSIONS[_role] | _granted
