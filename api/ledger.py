"""GET /admin/v1/ledger: the ledger itself, as NDJSON in position order (docs/AUDIT.md), for
auditors and owners. `after` (a position, default 0) and `limit` (1..LEDGER_LIMIT_MAX, default
LEDGER_LIMIT_DEFAULT) page through it: the next page starts after the last line's position.
Lines are read a page of LEDGER_READ_ROWS at a time and sent as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from litestar import Request, get
from litestar.response import Stream

from api.deps import Deps
from api.pagination import ascii_digits
from api.read_your_writes import POSITION_MAX_DIGITS
from domain.errors import FieldError, Unavailable, ValidationFailed

LEDGER_LIMIT_DEFAULT = 1000  # entries per response when no limit is given
LEDGER_LIMIT_MAX = 10_000  # entries per response, at most
LEDGER_READ_ROWS = 1000  # entries per database read while streaming
LIMIT_MAX_CHARS = 5
NDJSON = "application/x-ndjson"


def _after(raw: str | None) -> int:
    if raw is None:
        return 0
    if not ascii_digits(raw, POSITION_MAX_DIGITS) or int(raw) >= 2**63:
        raise ValidationFailed([FieldError("after", "must be a ledger position: an integer >= 0")])
    return int(raw)


def _limit(raw: str | None) -> int:
    if raw is None:
        return LEDGER_LIMIT_DEFAULT
    if not ascii_digits(raw, LIMIT_MAX_CHARS) or not 1 <= int(raw) <= LEDGER_LIMIT_MAX:
        raise ValidationFailed([FieldError("limit", f"must be an integer from 1 to {LEDGER_LIMIT_MAX}")])
    return int(raw)


@get("/admin/v1/ledger", summary="The ledger as NDJSON in position order (after, limit)",
     tags=["audit"])
async def ledger_entries(request: Request[Any, Any, Any], deps: Deps) -> Stream:
    q = request.query_params
    after, limit = _after(q.get("after")), _limit(q.get("limit"))
    read = deps.ledger_page
    if read is None:
        raise Unavailable("the ledger export is not configured in this process")

    async def lines() -> AsyncIterator[bytes]:
        position, left = after, limit
        while left > 0:
            page = await anyio.to_thread.run_sync(read, position, min(left, LEDGER_READ_ROWS))
            if not page:
                return
            yield b"".join(line for _, line in page)
            position, left = page[-1][0], left - len(page)
            if len(page) < min(left + len(page), LEDGER_READ_ROWS):
                return

    return Stream(lines(), media_type=NDJSON)
