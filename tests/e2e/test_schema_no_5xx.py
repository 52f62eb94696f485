"""Every route of the OpenAPI schema, fed what schemathesis generates from it (valid and invalid
bodies, parameters and headers, with the owner's token): no answer is a 5xx (issue 20).

The service runs in a thread of this process (tests.conftest.background_roles), so the test is a
plain synchronous hypothesis test; each operation gets a bounded number of examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from infra.embedded import free_port
from infra.fake_razorpay import DEFAULT_KEY_SECRET, FakeRazorpay
from infra.wiring import Runtime
from tests.conftest import TEST_ADMIN_TOKEN, background_roles, http_status, make_settings, wait_sync
from tests.e2e.conftest import close_and_drop

EXAMPLES_PER_OPERATION = 25
REQUEST_TIMEOUT_S = 10.0
AUTH = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, server_urls: tuple[str, str]) -> Iterator[str]:
    # Payments configured (against the fake Razorpay): unconfigured, payment orders and webhooks
    # answer 503 "payments not configured" by design, whatever is sent.
    with FakeRazorpay() as fake:
        settings_ = make_settings(
            Path(tmp_path_factory.mktemp("schema")), port=free_port(),
            razorpay_key_id=fake.key_id, razorpay_key_secret=DEFAULT_KEY_SECRET,
            razorpay_base_url=fake.url, razorpay_webhook_secrets=("schema-webhook-secret",))
        rt = Runtime.open(settings_, *server_urls)
        base = f"http://127.0.0.1:{settings_.port}"
        try:
            with background_roles(rt, {"api", "relay", "project"}):
                wait_sync(lambda: http_status(f"{base}/health/ready") == 200, "up")
                yield base
        finally:
            close_and_drop(server_urls[0], settings_.pg_schema, rt)


@pytest.fixture(scope="module")
def api_schema(service: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{service}/schema/openapi.json")


def test_no_route_answers_a_server_error(api_schema: schemathesis.BaseSchema, service: str) -> None:
    # One hypothesis run per operation (schemathesis's own pytest plugin does not load under
    # this pytest); a failing operation is recorded and the others still run.
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) > 20  # the schema really lists the routes

    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def no_server_error(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=service, headers=AUTH, timeout=REQUEST_TIMEOUT_S)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        try:
            no_server_error()
        except AssertionError as e:
            failures[operation.label] = str(e)[:1000]
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
