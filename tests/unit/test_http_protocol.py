"""CoalescingTransport: the writes of one loop step reach the socket as one; a close or EOF
sends what is pending first; an abort or a peer that went away drops it."""

from __future__ import annotations

import asyncio

import pytest

from infra.http_protocol import CoalescingTransport

pytestmark = pytest.mark.anyio


class RecordingTransport(asyncio.Transport):
    """The transport boundary, in memory: what a socket would have been asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.calls: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        self.calls.append("write")

    def close(self) -> None:
        self.closing = True
        self.calls.append("close")

    def write_eof(self) -> None:
        self.calls.append("eof")

    def abort(self) -> None:
        self.closing = True
        self.calls.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def _next_step() -> None:
    await asyncio.sleep(0)  # lets the flush scheduled with call_soon run (no timing involved)


async def test_writes_of_one_step_are_sent_once_joined() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
    t.write(b'{"accepted":1}')
    assert raw.sent == [] and t.get_write_buffer_size() == 39
    await _next_step()
    assert raw.sent == [b'HTTP/1.1 202 Accepted\r\n\r\n{"accepted":1}']
    t.write(b"next")
    await _next_step()
    assert raw.sent[1:] == [b"next"] and t.get_write_buffer_size() == 0


async def test_close_and_eof_send_what_is_pending_first() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())
    t.writelines([b"a", b"b"])
    t.write_eof()
    t.write(b"c")
    t.close()
    await _next_step()  # the scheduled flushes find nothing left
    assert raw.sent == [b"ab", b"c"] and raw.calls == ["write", "eof", "write", "close"]


async def test_abort_or_a_closed_peer_drops_pending_writes() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())
    t.write(b"lost")
    t.abort()
    await _next_step()
    assert raw.sent == [] and raw.calls == ["abort"]
    gone = RecordingTransport()
    t = CoalescingTransport(gone, asyncio.get_running_loop())
    t.write(b"too late")
    gone.closing = True  # the client disconnected before the step ended
    await _next_step()
    assert gone.sent == []
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else goes through
