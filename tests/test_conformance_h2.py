"""HTTP/2 conformance (RFC 9113, RFC 7541) as h2spec checks it: hand-built frames on a raw
socket, the server's frames read back and checked for what the RFC asks (the error code, a
connection or a stream error, the answer), on both HTTP/1.1 parsers (h2c arrives through the
HTTP/1.1 connection, which recognises the preface)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
POST = [(":method", "POST"), (":scheme", "http"), (":path", "/read"), (":authority", "x")]
END_STREAM, END_HEADERS = 0x1, 0x4


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    if scope["path"] == "/read":
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok:" + body})


def raw(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame as bytes, whatever it holds (h2spec sends what no client library would)."""
    return struct.pack("!I", len(payload))[1:] + bytes((kind, flags)) + struct.pack("!I", stream_id) + payload


class RawH2:
    """A client socket past the preface and SETTINGS exchange; ``frames()`` reads what comes."""

    def __init__(self, srv: Any) -> None:
        self.sock = socket.create_connection((srv.host, srv.port), timeout=5)
        self.encoder = Encoder()
        self.buf = b""
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())
        self.eof = False
        got = self.frames(until=lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
        assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in got)
        self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())

    def block(self, headers: list[tuple[str, str]]) -> bytes:
        return self.encoder.encode(headers)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def frames(self, until: Any = None, timeout: float = 5.0) -> list[Frame]:
        """Frames until ``until(frame)`` is true, the connection ends, or the timeout."""
        out: list[Frame] = []
        self.sock.settimeout(timeout)
        while True:
            while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    return out
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    self.eof = True
                    return out
                self.buf += chunk
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            frame.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            out.append(frame)
            if until is not None and until(frame):
                return out

    def close(self) -> None:
        self.sock.close()


def goaway(frames: list[Frame]) -> int | None:
    return next((f.error_code for f in frames if isinstance(f, GoAwayFrame)), None)


def test_hpack_decoding_errors_are_compression_errors(serve: Any) -> None:
    """RFC 9113 §4.3: a field block that cannot be decoded is a connection error of type
    COMPRESSION_ERROR (h2 says PROTOCOL_ERROR); h2spec's hpack cases."""
    with serve(app) as srv:
        for before, after in (
            (b"", b"\xff\x70"),  # indexed field, index beyond both tables (hpack 2.3.3)
            (b"", b"\x80"),  # indexed field with index 0 (hpack 6.1)
            (b"\x3f\xe2\x1f", b""),  # table size update to 4097, beyond SETTINGS_HEADER_TABLE_SIZE (6.3)
            (b"", b"\x40\x81\xff\x81\x1f"),  # a Huffman string with the EOS symbol (hpack 5.2)
            (b"", b"\x20"),  # a table size update after a field (hpack 4.2)
        ):
            client = RawH2(srv)
            payload = before + client.block(GET) + after
            client.send(raw(1, END_STREAM | END_HEADERS, 1, payload))
            frames = client.frames(until=lambda f: isinstance(f, GoAwayFrame))
            assert goaway(frames) == ErrorCodes.COMPRESSION_ERROR, (before, after, frames)
            assert not any(isinstance(f, HeadersFrame) for f in frames)
            client.close()


def test_client_goaway_lets_streams_in_flight_finish(serve: Any) -> None:
    """RFC 9113 §6.8: a client's GOAWAY (graceful: it will accept no push) does not end its
    own streams: the request body still sent is read and the response delivered; what the
    server had queued (its SETTINGS ACK, a PING ACK) is not discarded. Before, h2 closed the
    connection state at the GOAWAY: the rest of the body was a PROTOCOL_ERROR, the response lost."""
    with serve(app) as srv:
        client = RawH2(srv)
        client.send(
            raw(1, END_HEADERS, 1, client.block(POST)),
            raw(0, 0, 1, b"ab"),
            GoAwayFrame(0, last_stream_id=0, error_code=0).serialize(),
        )
        client.send(raw(0, END_STREAM, 1, b"cd"))
        frames = client.frames(until=lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert goaway(frames) is None, frames
        assert [bytes(f.data) for f in frames if isinstance(f, DataFrame)] == [b"ok:abcd"]
        client.frames(timeout=5)
        assert client.eof  # nothing left in flight: the server closes
        client.close()

        client = RawH2(srv)
        client.send(GoAwayFrame(0, last_stream_id=0, error_code=0xFF).serialize(),
                    PingFrame(0, opaque_data=b"h2spec!!").serialize())
        frames = client.frames(timeout=5)
        pongs = [bytes(f.opaque_data) for f in frames if isinstance(f, PingFrame) and "ACK" in f.flags]
        assert pongs == [b"h2spec!!"], frames
        assert client.eof
        client.close()


def test_stream_and_connection_errors(serve: Any) -> None:
    """A sample of h2spec's state and frame cases, kept as the RFC wants them."""
    with serve(app) as srv:
        cases: list[tuple[str, Any, Any]] = [
            # (what, frames after the handshake, expectation)
            ("DATA on an idle stream", lambda c: [raw(0, END_STREAM, 1, b"x")], ("goaway", ErrorCodes.PROTOCOL_ERROR)),
            ("even stream id", lambda c: [raw(1, 5, 2, c.block(GET))], ("goaway", ErrorCodes.PROTOCOL_ERROR)),
            ("DATA beyond MAX_FRAME_SIZE", lambda c: [raw(1, END_HEADERS, 1, c.block(POST)), raw(0, 0, 1, b"a" * 16385)],
             ("goaway", ErrorCodes.FRAME_SIZE_ERROR)),
            ("half-closed (remote): DATA", lambda c: [raw(1, 5, 1, c.block(GET)), raw(0, END_STREAM, 1, b"x")],
             ("rst", ErrorCodes.STREAM_CLOSED)),
            ("SETTINGS_ENABLE_PUSH 2", lambda c: [raw(4, 0, 0, b"\x00\x02\x00\x00\x00\x02")],
             ("goaway", ErrorCodes.PROTOCOL_ERROR)),
            ("INITIAL_WINDOW_SIZE 2^31", lambda c: [raw(4, 0, 0, b"\x00\x04\x80\x00\x00\x00")],
             ("goaway", ErrorCodes.FLOW_CONTROL_ERROR)),
            ("PING of 6 bytes", lambda c: [raw(6, 0, 0, b"123456")], ("goaway", ErrorCodes.FRAME_SIZE_ERROR)),
            ("WINDOW_UPDATE 0", lambda c: [raw(8, 0, 0, b"\x00\x00\x00\x00")], ("goaway", ErrorCodes.PROTOCOL_ERROR)),
            ("connection header", lambda c: [raw(1, 5, 1, c.block(GET + [("connection", "close")]))],
             ("error", ErrorCodes.PROTOCOL_ERROR)),
            ("content-length mismatch",
             lambda c: [raw(1, END_HEADERS, 1, c.block(POST + [("content-length", "10")])), raw(0, END_STREAM, 1, b"abc")],
             ("error", ErrorCodes.PROTOCOL_ERROR)),
        ]
        for what, frames, (kind, code) in cases:
            client = RawH2(srv)
            client.send(*frames(client))
            got = client.frames(until=lambda f: isinstance(f, (GoAwayFrame, RstStreamFrame)))
            errors = [(("goaway" if isinstance(f, GoAwayFrame) else "rst"), f.error_code)
                      for f in got if isinstance(f, (GoAwayFrame, RstStreamFrame))]
            assert errors, what
            if kind == "error":
                assert errors[0][1] == code, what
            else:
                assert errors[0] == (kind, code), what
            client.close()


def test_expect_100_continue(serve: Any) -> None:
    """RFC 9110 §10.1.1 is not HTTP/1.1's alone: a request with Expect: 100-continue gets its
    100 (an informational HEADERS) once the app asks for the body, and the client then sends
    it. Before, the expectation was dropped on HTTP/2: the client waited for a 100 that never came."""
    with serve(app) as srv:
        client = RawH2(srv)
        client.send(raw(1, END_HEADERS, 1, client.block(POST + [("expect", "100-continue"), ("content-length", "3")])))
        [head] = client.frames(until=lambda f: isinstance(f, HeadersFrame))
        assert isinstance(head, HeadersFrame) and "END_STREAM" not in head.flags
        assert Decoder().decode(head.data) == [(":status", "100")]
        client.send(raw(0, END_STREAM, 1, b"abc"))
        frames = client.frames(until=lambda f: isinstance(f, DataFrame) and "END_STREAM" in f.flags)
        assert [bytes(f.data) for f in frames if isinstance(f, DataFrame)] == [b"ok:abc"]
        client.close()
