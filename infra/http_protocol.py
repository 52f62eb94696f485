"""Uvicorn's httptools protocol with one send per response instead of two.

Uvicorn writes a response's status line and headers, then its body, each straight to the
socket: two send() calls, two TCP segments, and on loopback the kernel does the receiver's work
in the sender's time too. For a one-event ingest that was a sixth of the API's CPU. Here the
writes made in one event-loop step are joined and handed to the transport once, at the end of
the step (`loop.call_soon`), so a response that is written at once goes out in one segment.
Nothing else changes: a close (or EOF) first sends what is pending, and all other transport
calls go straight through.

It also caps what a request's head may cost before any route or credential is looked at, as
production HTTP servers do: the request line (414), one header (431) and all headers together
(431). httptools buffers a header until it ends, so the total is counted as bytes arrive and the
connection is answered and closed as soon as it is over the cap; one 64 MB header would
otherwise be held in memory whole.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

URL_MAX_BYTES = 8 * 1024  # the request target (path and query)
HEADER_MAX_BYTES = 8 * 1024  # one header, name and value
HEAD_MAX_BYTES = 64 * 1024  # the request line and every header together
# After a refusal the rest of the request is read and dropped for this long before the close:
# closing with unread input makes the kernel reset the connection, and the client would lose
# the answer (a "lingering close", as nginx and Apache do).
REFUSAL_LINGER_S = 2.0


class CoalescingTransport:
    """Forwards to a transport; `write` calls made in one loop step reach it as one."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return  # a close or EOF sent it already
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():  # the client went away: nothing to send to
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, is_closing, ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=...)`: the httptools protocol over a CoalescingTransport, with the
    request head capped."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0  # bytes received since the current request's head began
        self._parsed_head_bytes = 0  # the current request's target and headers, as parsed
        self._in_head = True
        self._refusal: tuple[HTTPStatus, str] | None = None
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered and closing: nothing more is read
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusal is None and self._in_head and self._head_bytes > HEAD_MAX_BYTES:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                         f"the request line and headers exceed {HEAD_MAX_BYTES} bytes")
        if self._refusal is not None:
            self._send_refusal(*self._refusal)

    def on_message_begin(self) -> None:
        self._parsed_head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        if len(self.url) + len(url) > URL_MAX_BYTES:
            self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG, f"the request target exceeds {URL_MAX_BYTES} bytes")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here as well: a head that arrives in one read is parsed whole before
        # data_received can count it.
        self._parsed_head_bytes += len(name) + len(value)
        if len(name) + len(value) > HEADER_MAX_BYTES:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                         f"a header exceeds {HEADER_MAX_BYTES} bytes")
            return
        if self._parsed_head_bytes > HEAD_MAX_BYTES:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                         f"the request line and headers exceed {HEAD_MAX_BYTES} bytes")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return  # never reaches the app
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            self._in_head = True  # a pipelined request's head may follow
            super().on_message_complete()

    def _refuse(self, status: HTTPStatus, detail: str) -> None:
        if self._refusal is None:
            self._refusal = (status, detail)

    def _send_refusal(self, status: HTTPStatus, detail: str) -> None:
        """A problem+json answer, then close: the rest of the head is never read."""
        body = json.dumps({"type": "about:blank", "title": status.phrase, "status": int(status),
                           "detail": detail}).encode()
        self.logger.warning("refused a request head: %s", detail)
        self.transport.write(
            f"HTTP/1.1 {int(status)} {status.phrase}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(REFUSAL_LINGER_S, self.transport.close)
        else:
            self.transport.close()
