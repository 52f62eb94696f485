"""Read-your-writes: the X-Ledger-Position header, and the waits that let a read see the writes
before it (or up to the position a client names) and a write settle into its read model."""

from __future__ import annotations

import contextlib
from typing import Any

from litestar import Request

from api.deps import ApiDeps
from api.pagination import ascii_digits
from domain.errors import FieldError, Unavailable, ValidationFailed

LEDGER_POSITION_HEADER = "X-Ledger-Position"
POSITION_MAX_DIGITS = 19


def min_position(request: Request[Any, Any, Any]) -> int:
    raw = request.headers.get(LEDGER_POSITION_HEADER.lower())
    if raw is None:
        return 0
    if not ascii_digits(raw, POSITION_MAX_DIGITS):
        raise ValidationFailed([FieldError(LEDGER_POSITION_HEADER, "must be a ledger position")])
    return int(raw)


async def wait_caught_up(deps: ApiDeps, request: Request[Any, Any, Any], projection: str) -> None:
    """Reads see every write committed before them (or up to X-Ledger-Position)."""
    head = await deps.tracking.head()
    reachable(min_position(request), head)  # a position beyond the head: 422 at once
    await deps.tracking.wait_for(projection, head, deps.read_wait_s)


async def wait_for_position(deps: ApiDeps, request: Request[Any, Any, Any], projection: str) -> None:
    """Wait only for X-Ledger-Position, if sent (reads that would chase a moving head)."""
    position = min_position(request)
    if position:
        reachable(position, await deps.tracking.head())
        await deps.tracking.wait_for(projection, position, deps.read_wait_s)


def reachable(position: int, head: int) -> int:
    """A position the ledger has reached; one beyond its head is refused at once (422), not
    waited for: nothing says it will ever exist, and a wait would hold the request for
    nothing."""
    if position > head:
        raise ValidationFailed([FieldError(
            LEDGER_POSITION_HEADER, f"{position} is beyond the ledger's head ({head}); send a "
                                    "position a write of this API returned")])
    return position


async def settle(deps: ApiDeps, projection: str, position: int) -> None:
    """Give a write that clients use at once (a key, a meter) the chance to reach its read
    model before answering. The write is committed either way: on timeout we answer anyway."""
    if not position:
        return
    with contextlib.suppress(Unavailable):
        await deps.tracking.wait_for(projection, position, deps.read_wait_s)
