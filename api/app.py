"""Builds the Litestar app from injected dependencies, wrapped in the request-id middleware."""

from __future__ import annotations

from litestar import Litestar, Router
from litestar.config.app import ExperimentalFeatures
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp

from api import health, input_rules, problems, reference
from api import invoice_runs as run_history
from api.audit import AuditController
from api.auth import admin_guard, provide_actor
from api.credit_notes import CreditNoteController
from api.deps import ApiDeps
from api.docs_page import OfflineSwaggerPage
from api.idempotency import IdempotencyMiddleware
from api.ingest import ingest
from api.invoice_runs import invoice_run
from api.invoices import InvoiceController
from api.keys import KeyController
from api.ledger import ledger_entries
from api.meters import MeterController
from api.observability import Metrics, OpsCollector, RequestIdMiddleware
from api.organisations import OrganisationController, organisation_balance
from api.payments import PaymentController
from api.permissions import rule_for
from api.plans import PlanController
from api.projects import ProjectController
from api.reconciliations import ReconciliationController
from api.subscriptions import SubscriptionController
from api.tokens import TokenController
from api.usage import organisation_usage, own_usage
from api.webhook_endpoints import WebhookEndpointController
from api.webhooks import razorpay_webhook

MAX_BODY_BYTES = 1024 * 1024  # API.md: 413 over 1 MiB


def check_rules(app: Litestar) -> None:
    """Every admin route must have a permission rule: refuse to start otherwise."""
    for route in app.routes:
        if not route.path_format.startswith("/admin/"):
            continue
        for method in sorted(getattr(route, "methods", set()) - {"OPTIONS", "HEAD"}):
            if rule_for(method, route.path_format) is None:
                raise RuntimeError(f"{method} {route.path_format} has no rule in api/permissions.py")


def create_app(deps: ApiDeps) -> tuple[Litestar, ASGIApp]:
    """Return the Litestar app and the ASGI callable to serve (the app plus request ids)."""
    metrics = Metrics()
    metrics.registry.register(OpsCollector(deps.ops_snapshot))
    admin = Router(
        path="/",
        # One controller (or handler) per resource: a path leads to one module.
        route_handlers=[OrganisationController, organisation_balance, organisation_usage,
                        ProjectController, KeyController, TokenController, MeterController,
                        PlanController, SubscriptionController, InvoiceController, invoice_run,
                        PaymentController, AuditController,
                        WebhookEndpointController],
        guards=[admin_guard],
        middleware=[IdempotencyMiddleware],  # every admin POST and PUT honours Idempotency-Key
    )
    admin.register(CreditNoteController)
    admin.register(ledger_entries)  # GET /admin/v1/ledger (docs/AUDIT.md)
    admin.register(ReconciliationController)
    for handler in (run_history.invoice_runs, run_history.invoice_run_record):  # the invoice runs' history
        admin.register(handler)
    app = Litestar(
        # The webhook is outside the admin router: signed, not authenticated by a token.
        route_handlers=[health.live, health.ready, health.metrics, admin, ingest, own_usage,
                        razorpay_webhook],
        # Handlers take `deps: ApiDeps`; guards and middleware, outside injection, read app.state.
        dependencies={"deps": Provide(lambda: deps, use_cache=True, sync_to_thread=False),
                      "actor": Provide(provide_actor, sync_to_thread=False)},
        exception_handlers={Exception: problems.handle},
        before_request=input_rules.check_request,  # docs/INPUT.md: strings, JSON bodies
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(title="Billing ledger API", version="1",
                                     render_plugins=[OfflineSwaggerPage()]),  # api/docs_page.py
        debug=False,
        logging_config=None,  # infra/logs.py owns logging (JSON lines)
        experimental_features=list[ExperimentalFeatures](),
    )
    check_rules(app)
    reference.install(app)  # api/reference.py: the document's parameters, security and errors
    app.state.deps = deps
    app.state.metrics = metrics
    return app, RequestIdMiddleware(app, metrics)
