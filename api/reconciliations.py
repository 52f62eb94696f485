"""Admin routes for reconciliations (auditor, owner): run one (a replay of the ledger and the
checks of docs/RECONCILIATION.md, recorded in the ledger) and read those recorded.

POST runs the replay in a worker thread and answers its whole report: the ledger position it
covers, and each check's compared count, ledger facts and differences (expected, actual and the
ledger positions involved). `ok` is false on any difference, or on a check that compared nothing
while the ledger holds facts of its kind."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath

from api.auth import Acting
from api.deps import Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.errors import FieldError, NotFound, Unavailable, ValidationFailed
from domain.period import parse_period
from domain.reconciliation import Report
from projections import reconciliations as view


class ReconcileIn(msgspec.Struct, forbid_unknown_fields=True):
    """What to reconcile: everything, or one organisation's rows, or one period's."""

    period: str | None = None
    organisation_id: UUID | None = None


_STRICT = msgspec.json.Decoder(ReconcileIn)


class ReconciliationOut(msgspec.Struct, frozen=True):
    id: UUID
    completed_at: datetime
    ledger_position: int
    ok: bool
    differences: int
    report_sha256: str
    organisation_id: UUID | None
    period: str | None
    report: dict[str, Any] | None = None


class ReconciliationPage(msgspec.Struct, frozen=True):
    items: list[ReconciliationOut]


def report_out(report: Report) -> dict[str, Any]:
    """The report as JSON, with each check's verdict and the whole one."""
    out: dict[str, Any] = msgspec.to_builtins(report)
    out["ok"] = report.ok
    out["difference_count"] = report.difference_count
    for check, shown in zip(report.checks, out["checks"], strict=True):
        shown["ok"], shown["silent"] = check.ok, check.silent
    return out


def _parse(body: bytes) -> ReconcileIn:
    if not body.strip():
        return ReconcileIn()
    try:
        data = _STRICT.decode(body)
    except msgspec.ValidationError as e:
        raise ValidationFailed([FieldError("body", str(e))]) from None
    except msgspec.DecodeError:
        raise ValidationFailed([FieldError("body", "must be a JSON object")]) from None
    if data.period is not None:
        parse_period(data.period)
    return data


class ReconciliationController(Controller):
    """Run a reconciliation; list and read the recorded ones."""

    path = "/admin/v1"
    tags = ["reconciliations"]

    @post("/reconciliations", status_code=201,
          summary="Replay the ledger and check every read model, invoice, payment and number",
          description="Body (optional) {period: YYYY-MM, organisation_id}. 201 with the report,"
                      " recorded in the ledger (ReconciliationCompleted); its `ok` is false on"
                      " any difference. Runs as long as the replay takes.")
    async def run(self, request: Request[Any, Any, Any], deps: Deps,
                  actor: Acting) -> Response[dict[str, Any]]:
        data = _parse(await request.body())
        if deps.reconcile is None:
            raise Unavailable("reconciliation is not configured in this process")
        report, position = await anyio.to_thread.run_sync(partial(
            deps.reconcile, organisation_id=data.organisation_id, period=data.period,
            actor=actor))
        return Response(report_out(report), status_code=201,
                        headers={LEDGER_POSITION_HEADER: str(position)})

    @get("/reconciliations", summary="The recorded reconciliations, newest first")
    async def list_(self, request: Request[Any, Any, Any], deps: Deps) -> ReconciliationPage:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.ReconciliationRow]:
            with deps.read_pool.connection() as conn:
                return view.latest(conn)

        rows = await anyio.to_thread.run_sync(fetch)
        return ReconciliationPage([ReconciliationOut(**msgspec.structs.asdict(r)) for r in rows])

    @get("/reconciliations/{reconciliation_id:uuid}", summary="One reconciliation and its report")
    async def read(self, reconciliation_id: FromPath[UUID], request: Request[Any, Any, Any],
                   deps: Deps) -> ReconciliationOut:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> view.ReconciliationDetail | None:
            with deps.read_pool.connection() as conn:
                return view.get(conn, reconciliation_id)

        row = await anyio.to_thread.run_sync(fetch)
        if row is None:
            raise NotFound("reconciliation", reconciliation_id)
        return ReconciliationOut(**msgspec.structs.asdict(row))
