"""Small request helpers shared by routes: ids in paths, and read-your-writes waits."""

from __future__ import annotations

import contextlib
from typing import Any
from uuid import UUID

import anyio
from litestar import Request

from api.deps import ApiDeps
from api.pagination import ascii_digits
from domain.errors import FieldError, Unavailable, ValidationFailed

LEDGER_POSITION_HEADER = "X-Ledger-Position"
POSITION_MAX_DIGITS = 19


def parse_id(raw: str, what: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise ValidationFailed([FieldError("id", f"{what} id must be a UUID")]) from None


def min_position(request: Request[Any, Any, Any]) -> int:
    raw = request.headers.get(LEDGER_POSITION_HEADER.lower())
    if raw is None:
        return 0
    if not ascii_digits(raw, POSITION_MAX_DIGITS):
        raise ValidationFailed([FieldError(LEDGER_POSITION_HEADER, "must be a ledger position")])
    return int(raw)


async def wait_caught_up(deps: ApiDeps, request: Request[Any, Any, Any], projection: str) -> None:
    """Reads see every write committed before them (or up to X-Ledger-Position)."""
    position = min_position(request)
    await anyio.to_thread.run_sync(deps.gate.wait_until_current, projection, position,
                                   deps.read_wait_s)


async def settle(deps: ApiDeps, projection: str, position: int) -> None:
    """Give a write that clients use at once (a key, a meter) the chance to reach its read
    model before answering. The write is committed either way: on timeout we answer anyway."""
    if not position:
        return
    with contextlib.suppress(Unavailable):
        await anyio.to_thread.run_sync(deps.gate.wait_for, projection, position, deps.read_wait_s)
