"""Invoice runs: POST /admin/v1/invoice-runs drafts a period's invoices now (the scheduler does
it too); GET /admin/v1/invoice-runs lists the runs, newest first, and
GET /admin/v1/invoice-runs/{run_id} is one run: its progress (organisations done of total),
its counts and each organisation it did not invoice with why (projections/invoice_runs.py).

A run goes on in a thread of its own. The POST answers 200 with the result when the run ends
within RUN_ANSWER_WAIT_S; a longer run (or a request with `Prefer: respond-async`) answers 202
with the run's id and a Location to follow its progress, and the run carries on."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import Deps
from api.pagination import decode_cursor, encode_cursor, parse_limit
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.period import parse_period
from domain.records import RunResult
from projections import invoice_runs as view

log = logging.getLogger("billing.api.invoice_runs")

RUN_ANSWER_WAIT_S = 10.0  # a run that ends within this answers 200; a longer one 202
RESPOND_ASYNC = "respond-async"  # Prefer: respond-async (RFC 7240): answer 202 at once
T = TypeVar("T")


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
    id: UUID | None = None  # the run's record: GET /admin/v1/invoice-runs/{id}


class RunRecordOut(msgspec.Struct):
    """One run as recorded: `status` running | done | failed | interrupted; progress is
    organisations_done of organisations_total; `organisations` those not invoiced, with why
    (the first 1000; `more` counts the rest)."""

    id: UUID
    period: str
    status: str
    started_by: str  # the principal's id, or "scheduler"
    started_at: datetime
    finished_at: datetime | None
    organisations_total: int
    organisations_done: int
    created: int
    existing: int
    skipped: int
    not_due: int
    failed: int
    blocked: int
    organisations: list[NotInvoicedOut]
    more: int
    error: str | None  # why a failed run stopped


class RunPage(msgspec.Struct):
    items: list[RunRecordOut]
    next_cursor: str | None


def run_out(result: RunResult) -> RunOut:
    return RunOut(result.period, result.created, result.existing, result.skipped, result.not_due,
                  result.failed, [BlockedOut(b.organisation_id, b.name, b.missing_positions,
                                             b.read_models) for b in result.blocked],
                  result.failed_organisations,
                  [NotInvoicedOut(e.organisation_id, e.name, e.outcome, e.reason)
                   for e in result.entries], result.more, result.run_id)


def record_out(row: view.InvoiceRunRow) -> RunRecordOut:
    return RunRecordOut(
        row.id, row.period, row.status, row.started_by, row.started_at.astimezone(UTC),
        row.finished_at.astimezone(UTC) if row.finished_at else None, row.organisations_total,
        row.organisations_done, row.created, row.existing, row.skipped, row.not_due, row.failed,
        row.blocked, [NotInvoicedOut(e.organisation_id, e.name, e.outcome, e.reason)
                      for e in row.organisations], row.more, row.error)


def _settle(future: asyncio.Future[T], value: T | None = None,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)  # type: ignore[arg-type]


def _tell(loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], value: T | None = None,
          error: BaseException | None = None) -> None:
    """Settle `future` from the run's thread (nothing when the loop has closed meanwhile)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, value, error)


@post("/admin/v1/invoice-runs", status_code=200, tags=["invoices"],
      summary="Draft every subscribed organisation's invoice for a period (idempotent); 202 with"
              " the run's id when it takes long or `Prefer: respond-async` is sent")
async def invoice_run(data: JSONBody[RunRequest], deps: Deps, actor: Acting,
                      request: Request[Any, Any, Any]) -> Response[Any]:
    parse_period(data.period)  # a bad period is a 422 before any run starts
    loop = asyncio.get_running_loop()
    started: asyncio.Future[UUID] = loop.create_future()
    ended: asyncio.Future[RunResult] = loop.create_future()
    # An error after the answer was sent is the run record's and the log's, never unretrieved.
    ended.add_done_callback(lambda f: f.cancelled() or f.exception())

    def work() -> None:
        try:
            result = deps.invoice_runner.run(
                data.period, actor=actor, on_started=lambda run_id: _tell(loop, started, run_id))
        except BaseException as e:  # told to the request, or (after a 202) in the run's record
            if started.done():
                log.exception("invoice run %s failed", data.period)
            _tell(loop, started, error=e)
            _tell(loop, ended, error=e)
            return
        _tell(loop, ended, result)

    # The request's context (its idempotency key, its audit actor) goes with the run.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name=f"invoice-run-{data.period}",
                     daemon=True).start()
    run_id = await started  # a run in progress (409) or a bad period (422) is raised here
    if RESPOND_ASYNC not in request.headers.get("prefer", "").lower():
        with contextlib.suppress(TimeoutError):
            result = await asyncio.wait_for(asyncio.shield(ended), RUN_ANSWER_WAIT_S)
            return Response(run_out(result), status_code=200)
    with anyio.CancelScope(shield=True):
        row = await anyio.to_thread.run_sync(_read, deps, run_id)
    assert row is not None
    return Response(record_out(row), status_code=202,
                    headers={"Location": f"/admin/v1/invoice-runs/{run_id}"})


def _read(deps: Any, run_id: UUID) -> view.InvoiceRunRow | None:
    with deps.read_pool.connection() as conn:
        return view.get(conn, run_id)


@get("/admin/v1/invoice-runs", tags=["invoices"],
     summary="Invoice runs, newest first (filter by period): counts, progress, and each"
             " organisation not invoiced with why")
async def invoice_runs(request: Request[Any, Any, Any], deps: Deps) -> RunPage:
    query = request.query_params
    limit = min(parse_limit(query.get("limit")), view.LIST_MAX_ROWS)
    after = decode_cursor(query.get("cursor"))
    period = query.get("period")
    if period is not None:
        parse_period(period)
    unknown = sorted(set(query.keys()) - {"limit", "cursor", "period"})
    if unknown:
        raise ValidationFailed([FieldError(name, "is not a parameter of this list")
                                for name in unknown])

    def fetch() -> list[view.InvoiceRunRow]:
        with deps.read_pool.connection() as conn:
            return view.page(conn, limit + 1, after, period)

    rows = await anyio.to_thread.run_sync(fetch)
    items = [record_out(r) for r in rows[:limit]]
    following = encode_cursor(rows[limit - 1].started_at, rows[limit - 1].id) \
        if len(rows) > limit else None
    return RunPage(items, following)


@get("/admin/v1/invoice-runs/{run_id:uuid}", tags=["invoices"],
     summary="One invoice run: status, progress (organisations done of total), counts, and each"
             " organisation not invoiced with why")
async def invoice_run_record(run_id: FromPath[UUID], deps: Deps) -> RunRecordOut:
    row = await anyio.to_thread.run_sync(_read, deps, run_id)
    if row is None:
        raise NotFound("invoice run", run_id)
    return record_out(row)
