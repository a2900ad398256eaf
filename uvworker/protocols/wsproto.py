"""Where uvworker depends on the ``websockets`` package's protocol object, and on its internals.

``websockets``' sans-I/O ``ServerProtocol`` does RFC 6455 and 7692: frame parsing and
serialisation, masking, control frames, the close handshake, size limits, permessage-deflate.
uvworker uses it through this module only, and two things here lean on internals that a new
``websockets`` release could change (``tests/test_wsproto.py`` drives them with bytes, so such a
change fails there first):

* the frame parser is restarted on :class:`PayloadReader` (it replaces the protocol's
  ``reader`` and ``parser`` attributes and calls its ``parse()`` generator), which slices
  frames out of the reads instead of copying every payload into one buffer first;
* ``recv_frame`` clears ``current_size`` when a close frame arrives between the fragments of a
  message (RFC 6455 5.4 allows control frames there; websockets would fail it with 1002).

The handshake is checked with ``process_request`` on headers the HTTP parser has already read,
and the protocol object starts in the OPEN state, expecting frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

try:
    from websockets.datastructures import Headers as _Headers
    from websockets.exceptions import InvalidHandshake
    from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
    from websockets.frames import BINARY, CLOSE, CONT, PONG, TEXT, Frame
    from websockets.http11 import Request as _Request
    from websockets.protocol import OPEN
    from websockets.server import ServerProtocol as _ServerProtocol

    AVAILABLE = True
except ImportError:  # --ws auto without websockets: upgrade requests are served as HTTP
    AVAILABLE = False

__all__ = [
    "AVAILABLE", "BINARY", "CLOSE", "CONT", "OPEN", "PONG", "TEXT", "Frame", "HandshakeError",
    "PayloadReader", "check_handshake", "new_protocol", "release",
]


class HandshakeError(Exception):
    """The upgrade request is not a valid WebSocket handshake (the message says why)."""


class PayloadReader:
    """The byte stream ``websockets``' frame parser reads, without two copies of every payload.

    websockets' own ``StreamReader`` appends each read to one bytearray and slices every frame
    out of it: two copies of a message before unmasking. This one keeps reads as they came and
    hands out memoryview slices of them; only a piece that straddles two reads is joined.
    Unmasking (``apply_mask``) then makes the one copy a payload needs. It offers what the
    protocol uses once it is OPEN: ``feed_data``, ``feed_eof``, ``eof``, ``read_exact``,
    ``at_eof`` and ``discard`` (the handshake's ``read_line`` is never needed: the HTTP parser
    has read the request). Memory stays bounded as before: websockets checks a frame's length
    against ``max_size`` before reading its payload, and reading stops when the queue is full.
    """

    __slots__ = ("head", "pos", "rest", "size", "eof")

    def __init__(self) -> None:
        self.head = b""  # the read being consumed
        self.pos = 0  # bytes of head already consumed
        self.rest: deque[bytes] = deque()  # later reads
        self.size = 0  # unread bytes in all of them
        self.eof = False

    def feed_data(self, data: bytes) -> None:
        if self.eof:
            raise EOFError("stream ended")
        if self.size:
            self.rest.append(data)
        else:
            self.head, self.pos = data, 0
        self.size += len(data)

    def feed_eof(self) -> None:
        if self.eof:
            raise EOFError("stream ended")
        self.eof = True

    def read_exact(self, n: int) -> Generator[None, None, bytes | bytearray | memoryview]:
        while self.size < n:
            if self.eof:
                raise EOFError(f"stream ends after {self.size} bytes, expected {n} bytes")
            yield
        self.size -= n
        head, pos = self.head, self.pos
        end = pos + n
        if end > len(head):
            if pos == len(head):  # head used up: the piece starts the next read
                head = self.head = self.rest.popleft()
                pos, end = 0, n
            if end > len(head):
                return self._join(n)
        self.pos = end
        # A small piece is cheaper copied than viewed; a payload is viewed, not copied.
        return head[pos:end] if n < 1024 else memoryview(head)[pos:end]

    def _join(self, n: int) -> bytearray:
        """The next ``n`` bytes, which run past the current read (all there: size >= n)."""
        joined = bytearray(memoryview(self.head)[self.pos :])
        rest = self.rest
        while True:
            head = rest.popleft()
            end = n - len(joined)
            if end <= len(head):
                joined += memoryview(head)[:end]
                self.head, self.pos = head, end
                return joined
            joined += head

    def at_eof(self) -> Generator[None, None, bool]:
        while not self.size:
            if self.eof:
                return True
            yield
        return False

    def discard(self) -> None:
        self.head, self.pos, self.size = b"", 0, 0
        self.rest.clear()


if AVAILABLE:

    class Protocol(_ServerProtocol):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            # Restart the frame parser on a reader that does not copy payloads twice.
            self.reader = PayloadReader()  # type: ignore[assignment]
            self.parser = self.parse()
            next(self.parser)

        def recv_frame(self, frame: Frame) -> None:
            if frame.opcode is CLOSE and self.current_size is not None:
                # A close between fragments ends the connection and the unfinished message.
                self.current_size = None
            super().recv_frame(frame)


def new_protocol(max_size: int, per_message_deflate: bool) -> Any:
    """A server protocol object in the OPEN state (the handshake is checked separately)."""
    extensions = enable_server_permessage_deflate(None) if per_message_deflate else None
    return Protocol(extensions=extensions, max_size=max_size, state=OPEN)


def release(protocol: Any) -> None:
    """The connection is over: break the protocol object's reference cycles, so that it is
    freed by reference counting. Its frame parser is a suspended generator whose frame holds
    the protocol until it has read EOF (which a connection reset, or closed by us first, never
    feeds it), and the error it stopped on, if any, holds that frame in its traceback."""
    protocol.parser.close()
    protocol.parser_exc = None


def check_handshake(protocol: Any, headers: list[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """Check an upgrade request's headers; (Sec-WebSocket-Accept value, the negotiated
    Sec-WebSocket-Extensions value or None). Raises HandshakeError."""
    parsed = _Headers((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers)
    try:
        accept_key, extensions, _ = protocol.process_request(_Request("/", parsed))
    except InvalidHandshake as exc:
        raise HandshakeError(str(exc)) from None
    return accept_key, extensions
