"""WebSocket conformance (RFC 6455) by the Autobahn|Testsuite case families, with frames built
by hand on a raw socket, on both parsers: what the client reads back (an echo, a pong, the
close code) and that the server closes TCP once the close handshake is done. The full
Autobahn run is tests/autobahn/run.py (not part of the default run: it needs Python 2.7)."""

from __future__ import annotations

import struct
import time
from typing import Any

from tests.test_websocket import RawWS, echo_app, frame

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def rsv(data: bytes, bits: int) -> bytes:
    """A hand-built frame with reserved bits set (``bits``: RSV1=4, RSV2=2, RSV3=1)."""
    return bytes((data[0] | bits << 4,)) + data[1:]


# (what, frames, the close code the server must fail the connection with)
FAILURES = [
    ("RSV1 without an extension", [rsv(frame(TEXT, b"x"), 4)], 1002),
    ("RSV2 and RSV3 on a ping", [rsv(frame(PING, b"x"), 3)], 1002),
    ("reserved data opcode 3", [frame(3, b"")], 1002),
    ("reserved control opcode 0xB", [frame(0xB, b"")], 1002),
    ("ping with 126 bytes", [frame(PING, b"a" * 126)], 1002),
    ("continuation without a start", [frame(CONT, b"x")], 1002),
    ("new message inside a fragmented one", [frame(TEXT, b"a", fin=False), frame(TEXT, b"b")], 1002),
    ("fragmented ping", [frame(PING, b"a", fin=False), frame(CONT, b"b")], 1002),
    ("invalid UTF-8 text", [frame(TEXT, b"\xce\xba\xed\xa0\x80")], 1007),
    ("close with a 1-byte payload", [frame(CLOSE, b"\x03")], 1002),
    ("close with a reason of invalid UTF-8", [frame(CLOSE, close_payload(1000, b"\xff"))], 1007),
    *((f"close code {code}", [frame(CLOSE, close_payload(code))], 1002)
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)),
]


def test_protocol_violations_fail_the_connection(serve: Any) -> None:
    with serve(echo_app()) as srv:
        for what, frames, code in FAILURES:
            with RawWS(srv) as raw:
                raw.upgrade()
                raw.send(b"".join(frames))
                assert raw.read_close()[0] == code, what
                assert raw.at_eof()


def test_invalid_utf8_fails_at_the_fragment_that_holds_it(serve: Any) -> None:
    """1007 as soon as the first invalid fragment arrives, not when the message would end."""
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        raw.send(frame(TEXT, "κό".encode()[:3], fin=False) + frame(CONT, b"\xffsme", fin=False))
        assert raw.read_close()[0] == 1007


def test_a_valid_close_code_is_echoed_and_tcp_closed(serve: Any) -> None:
    with serve(echo_app()) as srv:
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999):
            with RawWS(srv) as raw:
                raw.upgrade()
                raw.send(frame(CLOSE, close_payload(code, b"bye")))
                assert raw.read_close()[0] == code
                started = time.monotonic()
                assert raw.at_eof()
                assert time.monotonic() - started < 2.0, code  # the server closes TCP first (RFC 6455 §7.1.1)


def test_pings_and_pongs(serve: Any) -> None:
    """A ping of up to 125 bytes is answered with exactly its payload, also between the
    fragments of a message (at once, not after it); an unsolicited pong is ignored."""
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        payload = bytes(range(125))
        raw.send(frame(PING, payload) + frame(PING, b""))
        assert raw.read_frame() == (PONG, payload)
        assert raw.read_frame() == (PONG, b"")
        raw.send(frame(PONG, b"unasked") + frame(TEXT, b"a", fin=False) + frame(PING, b"mid"))
        assert raw.read_frame() == (PONG, b"mid")
        raw.send(frame(CONT, b"b"))
        assert raw.read_frame() == (TEXT, b"ab")
