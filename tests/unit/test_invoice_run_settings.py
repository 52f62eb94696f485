"""The invoice run's helper processes are a setting (issue 19), checked when it is read, and
reach the run the runtime builds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters.invoice_run import InvoiceRun
from infra.settings import DEFAULT_INVOICE_RUN_HELPERS, INVOICE_RUN_HELPERS_MAX, from_env


def test_one_helper_is_the_default_and_zero_means_the_run_alone() -> None:
    assert from_env({}).invoice_run_helpers == DEFAULT_INVOICE_RUN_HELPERS == 1
    assert from_env({"BILLING_INVOICE_RUN_HELPERS": "0"}).invoice_run_helpers == 0
    assert from_env({"BILLING_INVOICE_RUN_HELPERS": "3"}).invoice_run_helpers == 3


@pytest.mark.parametrize("value", ["-1", str(INVOICE_RUN_HELPERS_MAX + 1), "two"])
def test_a_helper_count_out_of_range_is_refused_at_start(value: str) -> None:
    with pytest.raises(ValueError, match=r"BILLING_INVOICE_RUN_HELPERS|invalid literal"):
        from_env({"BILLING_INVOICE_RUN_HELPERS": value})


def test_a_run_refuses_more_helpers_than_it_may_have() -> None:
    with pytest.raises(ValueError, match="helper processes"):
        InvoiceRun(None, None, None, "29", lambda: datetime.now(UTC),  # type: ignore[arg-type]
                   timedelta(hours=24), "public", helpers=INVOICE_RUN_HELPERS_MAX + 1)


def test_the_setting_allows_exactly_the_helpers_a_run_may_have() -> None:
    from adapters.invoice_run_helpers import HELPERS_MAX

    assert INVOICE_RUN_HELPERS_MAX == HELPERS_MAX
