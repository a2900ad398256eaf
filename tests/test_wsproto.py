"""``uvworker.protocols.wsproto``: what uvworker relies on in ``websockets``, internals included,
driven with bytes (no sockets). A ``websockets`` release that changes those internals fails
here first, in one place.
"""

from __future__ import annotations

import base64
import os
import struct

import pytest

from uvworker.protocols import wsproto

pytestmark = pytest.mark.skipif(not wsproto.AVAILABLE, reason="websockets is not installed")


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def received(protocol: object, *pieces: bytes) -> list[tuple[object, bytes, bool]]:
    frames = []
    for piece in pieces:
        protocol.receive_data(piece)  # type: ignore[attr-defined]
        frames += [(f.opcode, bytes(f.data), f.fin) for f in protocol.events_received()]  # type: ignore[attr-defined]
    return frames


def test_the_parser_reads_from_our_payload_reader() -> None:
    protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=False)
    assert isinstance(protocol.reader, wsproto.PayloadReader)
    assert protocol.state is wsproto.OPEN


@pytest.mark.parametrize("size", [5, 200, 70000])
def test_frames_cut_at_every_point_come_out_whole(size: int) -> None:
    payload = os.urandom(size)
    data = client_frame(0x2, payload) + client_frame(0x1, b"tail")
    step = max(1, len(data) // 50)
    for cut in range(1, len(data), step):
        protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=False)
        frames = received(protocol, data[:cut], data[cut:])
        assert frames == [(wsproto.BINARY, payload, True), (wsproto.TEXT, b"tail", True)], cut


def test_large_payloads_are_views_of_the_reads_not_copies() -> None:
    reader = wsproto.PayloadReader()
    reader.feed_data(b"a" * 5000)
    parse = reader.read_exact(4000)
    with pytest.raises(StopIteration) as done:
        next(parse)
    assert isinstance(done.value.value, memoryview)


def test_a_close_between_fragments_is_a_clean_close() -> None:
    protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=False)
    close = client_frame(0x8, struct.pack("!H", 1000) + b"bye")
    frames = received(protocol, client_frame(0x1, b"part", fin=False), close)
    assert [opcode for opcode, _, _ in frames] == [wsproto.TEXT, wsproto.CLOSE]
    assert protocol.close_rcvd.code == 1000  # not failed with 1002
    assert protocol.data_to_send()[0][:2] == b"\x88\x05"  # our close answer echoes 1000 + reason


def test_limits_and_protocol_errors_are_websockets_decisions() -> None:
    protocol = wsproto.new_protocol(max_size=100, per_message_deflate=False)
    received(protocol, client_frame(0x2, b"x" * 101))
    assert protocol.close_sent.code == 1009
    protocol = wsproto.new_protocol(max_size=100, per_message_deflate=False)
    received(protocol, b"\x82\x05hello")  # unmasked: a protocol error
    assert protocol.close_sent.code == 1002


def handshake_headers(key: bytes | None = None, extensions: str | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", b"a"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
               (b"sec-websocket-key", key if key is not None else base64.b64encode(os.urandom(16))),
               (b"sec-websocket-version", b"13")]
    if extensions:
        headers.append((b"sec-websocket-extensions", extensions.encode()))
    return headers


def test_check_handshake_gives_the_accept_key_and_negotiated_extensions() -> None:
    protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=True)
    key, extensions = wsproto.check_handshake(protocol, handshake_headers(b"dGhlIHNhbXBsZSBub25jZQ=="))
    assert key == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" and extensions is None  # RFC 6455's example
    protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=True)
    _, extensions = wsproto.check_handshake(protocol, handshake_headers(extensions="permessage-deflate"))
    assert extensions is not None and extensions.startswith("permessage-deflate")


def test_a_bad_handshake_is_a_handshake_error() -> None:
    protocol = wsproto.new_protocol(max_size=1 << 20, per_message_deflate=False)
    with pytest.raises(wsproto.HandshakeError, match="Sec-WebSocket-Key"):
        wsproto.check_handshake(protocol, handshake_headers(key=b"not base64!"))
