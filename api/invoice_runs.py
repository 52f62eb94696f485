"""POST /admin/v1/invoice-runs: draft a period's invoices now (the scheduler does it too)."""

from __future__ import annotations

from functools import partial
from uuid import UUID

import anyio
import msgspec
from litestar import post
from litestar.params import JSONBody

from api.auth import Acting
from api.deps import Deps


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    period: str


class BlockedOut(msgspec.Struct):
    organisation_id: UUID
    name: str
    missing_positions: list[int]
    read_models: dict[str, list[int]]  # read model -> its dead-lettered positions


class NotInvoicedOut(msgspec.Struct):
    organisation_id: UUID
    name: str
    outcome: str  # skipped, not_due, blocked or failed
    reason: str


class RunOut(msgspec.Struct):
    period: str
    created: int
    existing: int
    skipped: int
    not_due: int
    failed: int
    blocked: list[BlockedOut]
    failed_organisations: list[UUID]  # each one's error is in the service's log
    organisations: list[NotInvoicedOut]  # those not invoiced, with why (bounded)
    more: int  # how many more were not invoiced than `organisations` lists


@post("/admin/v1/invoice-runs", status_code=200, tags=["invoices"],
      summary="Draft every subscribed organisation's invoice for a period (idempotent)")
async def invoice_run(data: JSONBody[RunRequest], deps: Deps, actor: Acting) -> RunOut:
    result = await anyio.to_thread.run_sync(partial(deps.invoice_runner.run, data.period,
                                                    actor=actor))
    return RunOut(result.period, result.created, result.existing, result.skipped, result.not_due,
                  result.failed, [BlockedOut(b.organisation_id, b.name, b.missing_positions,
                                             b.read_models) for b in result.blocked],
                  result.failed_organisations,
                  [NotInvoicedOut(e.organisation_id, e.name, e.outcome, e.reason)
                   for e in result.entries], result.more)
