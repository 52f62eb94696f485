"""Admin Idempotency-Key (API.md Conventions; docs/IDEMPOTENCY.md): one ASGI middleware on the
admin router, so no route needs to know about it.

A POST or PUT with the header claims (principal, key) in the store before it runs. A retry of a
finished request gets the first answer again (`Idempotent-Replayed: true`), one-time secrets
left out; the same key with another request (method, path or body) is a 422; a retry while the
first still runs waits up to IDEMPOTENCY_BUSY_WAIT_S, then gets a 409 with Retry-After.

The command itself is guarded by the ledger: while the request runs, CURRENT_IDEMPOTENCY makes
its audit entries' ids derived from the claim (domain/audit.py), so a second execution of the
same command collides with the first in the ledger transaction and saves nothing. A claim left
by a process that died is taken over once its lease has run out; the ledger then tells whether
that command had committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import msgspec
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.credentials import authenticate_admin
from api.deps import ApiDeps
from api.problems import PROBLEM_JSON, problem_body
from domain.audit import (
    CURRENT_IDEMPOTENCY,
    IdempotentRequest,
    Recorded,
    idempotency_seed,
)
from domain.errors import FieldError
from domain.ports import IdempotencyStore
from domain.records import Claim, StoredResponse

log = logging.getLogger("billing.api")

HEADER = b"idempotency-key"
IDEMPOTENCY_KEY_MAX_CHARS = 255  # printable ASCII only (0x20..0x7e)
IDEMPOTENT_METHODS = frozenset({"POST", "PUT"})
IDEMPOTENCY_BUSY_WAIT_S = 2.0  # a retry waits this long for the first request to answer
BUSY_POLL_S = 0.05  # how often that retry looks again
BUSY_RETRY_AFTER_S = 1  # then: 409, come back after this many seconds
BODY_MAX_BYTES = 1024 * 1024  # as api.app.MAX_BODY_BYTES: a larger body is the app's 413
# Response fields that carry a secret shown once (an API key's `key`, an admin `token`): never
# stored, so a replay answers them as null and names them in SECRET_OMITTED_HEADER.
SECRET_RESPONSE_FIELDS = ("key", "token", "secret")  # secret: a tenant webhook endpoint's
REPLAYED_HEADER = "idempotent-replayed"
SECRET_OMITTED_HEADER = "idempotency-secret-omitted"
_NOT_STORED_HEADERS = frozenset({"content-length", "x-request-id", "date", "server"})

Answer = tuple[int, list[tuple[str, str]], bytes]


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> bytes:
    """What makes two requests 'the same request': method, route (path and query) and body."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def key_problem(raw: bytes) -> str | None:
    """Why `raw` is not a usable key (None when it is)."""
    if not 1 <= len(raw) <= IDEMPOTENCY_KEY_MAX_CHARS:
        return f"must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters"
    if any(b < 0x20 or b > 0x7E for b in raw):
        return "must be printable ASCII"
    return None


def _problem(status: int, detail: str, headers: list[tuple[str, str]] | None = None,
             errors: list[FieldError] | None = None, **extra: Any) -> Answer:
    body = problem_body(status, detail, errors) | extra
    return status, [("content-type", PROBLEM_JSON), *(headers or [])], msgspec.json.encode(body)


def recovered_answer(recorded: Recorded) -> Answer:
    """The answer for a request whose command had committed but whose answer was lost."""
    return _problem(
        409,
        "this Idempotency-Key's request was already carried out, but its answer was lost (the "
        "process that ran it stopped before answering); nothing was done again. `targets` "
        "names what it recorded: read them for their current state.",
        headers=[(REPLAYED_HEADER, "recovered")],
        targets=recorded.targets, audit_entry_id=str(recorded.entry_id))


def _redacted(headers: list[tuple[str, str]], body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """The answer as stored: without the one-time secrets it showed."""
    content_type = next((v for n, v in headers if n == "content-type"), "")
    if "json" not in content_type:
        return headers, body
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return headers, body
    if not isinstance(decoded, dict):
        return headers, body
    omitted = [f for f in SECRET_RESPONSE_FIELDS if isinstance(decoded.get(f), str)]
    if not omitted:
        return headers, body
    for name in omitted:
        decoded[name] = None
    return [*headers, (SECRET_OMITTED_HEADER, ",".join(omitted))], msgspec.json.encode(decoded)


async def _send_answer(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers
           if n not in _NOT_STORED_HEADERS]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(response: StoredResponse) -> Answer:
    headers = response.headers
    if not any(n == REPLAYED_HEADER for n, _ in headers):
        headers = [*headers, (REPLAYED_HEADER, "true")]
    return response.status, headers, response.body


async def _read_body(receive: Receive) -> tuple[list[dict[str, Any]], bytes | None]:
    """The request's messages as received, and its body (None: too large or the client left)."""
    messages: list[dict[str, Any]] = []
    size = 0
    while True:
        message = cast("dict[str, Any]", await receive())
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > BODY_MAX_BYTES:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replaying(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    pending = list(messages)

    async def again() -> Any:
        return pending.pop(0) if pending else await receive()

    return again


class IdempotencyMiddleware:
    """Honours Idempotency-Key on the admin router's POST and PUT routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] not in IDEMPOTENT_METHODS:
            await self.app(scope, receive, send)
            return
        raw_key = next((v for k, v in scope["headers"] if k == HEADER), None)
        deps: ApiDeps = scope["app"].state.deps
        store = deps.idempotency
        if raw_key is None or store is None:
            await self.app(scope, receive, send)
            return
        try:
            principal = await authenticate_admin(ASGIConnection(scope, receive), deps)
        except Exception:  # the admin guard answers it (401) the usual way
            await self.app(scope, receive, send)
            return
        problem = key_problem(raw_key)
        if problem is not None:
            await _send_answer(send, _problem(
                422, "the request is invalid; nothing was changed",
                errors=[FieldError("Idempotency-Key", problem)]))
            return
        key = raw_key.decode("ascii")
        messages, body = await _read_body(receive)
        receive = _replaying(messages, receive)
        if body is None:
            await self.app(scope, receive, send)
            return
        printed = fingerprint(scope["method"], scope["path"], scope.get("query_string", b""), body)
        claim = await self._claim(store, principal.id, key, printed)
        if claim.outcome == "mismatch":
            await _send_answer(send, _problem(
                422, "this Idempotency-Key was used for another request (another route or body); "
                "use a new key for a new request",
                errors=[FieldError("Idempotency-Key", "was used for another request")]))
            return
        if claim.outcome == "busy":
            await _send_answer(send, _problem(
                409, "a request with this Idempotency-Key is still running; retry "
                "after the Retry-After delay to get its answer",
                headers=[("retry-after", str(BUSY_RETRY_AFTER_S))]))
            return
        if claim.outcome == "replay":
            assert claim.response is not None
            await _send_answer(send, _replay(claim.response))
            return
        await self._run(store, principal.id, key, claim, scope, receive, send)

    async def _claim(self, store: IdempotencyStore, principal_id: Any, key: str,
                     printed: bytes) -> Claim:
        """Claim the key; while its holder still runs, look again until the wait is over.

        A deadline, not a cancel scope: a cancelled claim could be made and then lost."""
        deadline = anyio.current_time() + IDEMPOTENCY_BUSY_WAIT_S
        while True:
            claim = await anyio.to_thread.run_sync(store.claim, principal_id, key, printed)
            if claim.outcome != "busy" or anyio.current_time() + BUSY_POLL_S > deadline:
                return claim
            await anyio.sleep(BUSY_POLL_S)

    async def _run(self, store: IdempotencyStore, principal_id: Any, key: str, claim: Claim,
                   scope: Scope, receive: Receive, send: Send) -> None:
        assert claim.token is not None and claim.claimed_at is not None
        token = claim.token
        request = IdempotentRequest(idempotency_seed(principal_id, key, claim.claimed_at))
        finish: Callable[[StoredResponse], Awaitable[bool]] = lambda r: anyio.to_thread.run_sync(  # noqa: E731
            store.complete, principal_id, key, token, r)
        if claim.taken_over:  # its holder died: had it committed? The ledger knows.
            earlier = await anyio.to_thread.run_sync(store.recorded, request.first_entry_id())
            if earlier is not None:
                answer = recovered_answer(earlier)
                await self._keep(finish, answer)
                await _send_answer(send, answer)
                return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            raw = cast("dict[str, Any]", message)
            if raw["type"] == "http.response.start":
                start = raw
            elif raw["type"] == "http.response.body":
                chunks.append(raw.get("body", b""))

        reset = CURRENT_IDEMPOTENCY.set(request)
        try:
            # No release on an exception or cancellation: the command may have committed, so
            # the claim stays until its lease runs out and the ledger is asked.
            await self.app(scope, receive, capture)
        finally:
            CURRENT_IDEMPOTENCY.reset(reset)
        assert start is not None, "the app answered nothing"
        headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in start["headers"]]
        given: Answer = (int(start["status"]), headers, b"".join(chunks))
        if request.recorded is not None:  # a second execution collided with the first
            given = recovered_answer(request.recorded)
            await self._keep(finish, given)
        elif 200 <= given[0] < 300 or request.saves > 0:
            await self._keep(finish, (given[0], *_redacted(given[1], given[2])))
        elif given[0] >= 500:
            # The commit may have reached Postgres with its answer lost (a dropped connection):
            # the ledger tells. Recorded: that is the answer. Not (yet) seen: the claim stays
            # until its lease runs out, and the retry that takes it over asks the ledger again;
            # releasing it here would let a retry run the command a second time.
            earlier = None
            with contextlib.suppress(Exception):
                earlier = await anyio.to_thread.run_sync(store.recorded, request.first_entry_id())
            if earlier is not None:
                given = recovered_answer(earlier)
                await self._keep(finish, given)
        else:  # refused, and nothing recorded: a retry (after a fix) may run afresh
            try:
                await anyio.to_thread.run_sync(store.release, principal_id, key, token)
            except Exception:
                log.exception("could not release an idempotency key; its lease will")
        await _send_answer(send, given)

    @staticmethod
    async def _keep(finish: Callable[[StoredResponse], Awaitable[bool]], answer: Answer) -> None:
        status, headers, body = answer
        try:
            if not await finish(StoredResponse(status, headers, body)):
                log.warning("an idempotency claim was taken over before its answer was kept")
        except Exception:  # the client still gets its answer; a retry recovers from the ledger
            log.exception("could not keep an idempotent request's answer")
