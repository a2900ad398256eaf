"""WebSocket connections: the ASGI ``websocket`` scope on the ``websockets`` sans-I/O protocol.

The ``websockets`` library does RFC 6455 and 7692: frame parsing and serialisation, masking,
control frames, the close handshake, size limits and permessage-deflate. This module is the
bridge between that protocol object, the asyncio transport and the ASGI application — it
moves bytes, runs timers and turns frames into ASGI messages and back.

Theory of operation. ``HTTPConnection.on_head`` calls :func:`upgrade_to_websocket` for a GET
HTTP/1.1 request with ``Connection: upgrade`` and ``Upgrade: websocket``. The request head has
already been parsed there, so it is not parsed twice: the handshake is checked with
``ServerProtocol.process_request`` on the parsed headers and the protocol object starts in the
OPEN state, ready for frames. From then on the transport belongs to a
:class:`WebSocketConnection`, which goes through these phases:

    phase      bytes from the client              left by
    ---------  ---------------------------------  -------------------------------------------
    HANDSHAKE  buffered (bounded), not parsed     websocket.accept → OPEN (101 sent);
                                                  websocket.close → 403; denial → DENIAL;
                                                  an app error → 500
    DENIAL     discarded                          the app's HTTP response completes → close
    OPEN       parsed into frames → messages      the close handshake or a failure → close
    CLOSED     —                                  —

The bytes the HTTP parser read past the handshake (``parser.trailing_data``) are the first
frames; they are put in front of whatever arrived later when the app accepts.

Rules this module keeps:

* Received messages wait in a queue of at most ``ws_max_queue`` messages for the app's
  ``receive()``; when it is full the connection stops reading (backpressure), so a client that
  floods an app that does not read cannot grow server memory without bound. While reading is
  paused no keepalive ping is outstanding: an app that is slow is not the client's fault.
* Outgoing frames are batched (``batch.py``): what one connection produces during one turn of
  the event loop (the echoes of every message one read delivered, pongs, a close frame) goes
  out in one write — a syscall per batch, not per message; large payloads by reference. Data
  messages on a connection without extensions skip the protocol object: the frame header is
  built here.
* Incoming bytes reach the protocol's frame parser through :class:`_PayloadReader`, which
  slices frames out of the reads instead of copying them into one buffer first.
* Text is checked for UTF-8 frame by frame (an incremental decoder), so an invalid fragment
  fails the connection (1007) without waiting for the end of the message.
* Close codes: the app's ``websocket.close`` code; 1011 when the app raises after accepting
  or when a keepalive ping gets no pong in time; 1012 when the server retires; 1000 when the
  app returns with the connection still open; protocol errors from the client 1002, 1007,
  1009 (decided by ``websockets``). ``websocket.disconnect`` carries the peer's close code and
  reason, or the code we failed the connection with, or 1006 when the TCP connection was
  lost without a close frame.
* The connection is one request for the server's books: it counts against
  ``limit_concurrency`` while open, sits in ``ServerState.connections`` (``shutdown()`` /
  ``abort()`` like an HTTP connection) and is reported to ``request_done`` when it ends.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Generator
from contextvars import Context
from typing import TYPE_CHECKING, Any

from uvworker.protocols.batch import WriteBatch
from uvworker.core.response import error_response
from uvworker.errors import ClientDisconnected
from uvworker.protocols.cycle import RequestCycle

try:
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidHandshake
    from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
    from websockets.frames import BINARY, CLOSE, CONT, PONG, TEXT, Frame
    from websockets.http11 import Request
    from websockets.protocol import OPEN as PROTOCOL_OPEN
    from websockets.server import ServerProtocol

    class _ServerProtocol(ServerProtocol):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            # Restart the frame parser on a reader that does not copy payloads twice.
            self.reader = _PayloadReader()  # type: ignore[assignment]
            self.parser = self.parse()
            next(self.parser)

        def recv_frame(self, frame: Frame) -> None:
            if frame.opcode is CLOSE and self.current_size is not None:
                # RFC 6455 5.4 lets control frames come between fragments; a close ends the
                # connection and the unfinished message with it (websockets fails it with 1002).
                self.current_size = None
            super().recv_frame(frame)

except ImportError:  # --ws auto without websockets: upgrade requests are served as HTTP
    ServerProtocol = _ServerProtocol = None  # type: ignore[assignment,misc]


class _PayloadReader:
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


if TYPE_CHECKING:
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import ServerState

logger = logging.getLogger("uvworker.error")

HANDSHAKE, DENIAL, OPEN, CLOSED = range(4)

EARLY_DATA_LIMIT = 64 * 1024  # bytes a client may send before the app accepts, then we stop reading
WRITE_BATCH = 256 * 1024  # outgoing bytes held for one write before they are written at once
CLOSE_TIMEOUT = 10.0  # how long we wait for the client's close frame after sending ours
RETIRE_CODE = 1012  # "service restart": the client should reconnect, to another worker

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\n"

_warned = False


def upgrade_to_websocket(conn: HTTPConnection, scope: dict[str, Any]) -> bool:
    """Take over ``conn``'s transport for a WebSocket handshake; False to serve it as HTTP.

    ``scope`` is the HTTP scope ``conn`` built for the upgrade request (path, client, proxy
    headers applied); it becomes the websocket scope. ``--ws auto`` without the ``websockets``
    package installed serves upgrade requests as plain HTTP.
    """
    global _warned
    if ServerProtocol is None:
        if conn.config.ws == "websockets" and not _warned:
            _warned = True
            logger.error("--ws websockets needs the websockets package: pip install 'uvworker[standard]'")
        return False
    ws = WebSocketConnection(conn, scope)
    conn.transport.set_protocol(ws)
    ws.start()
    return True


class WebSocketConnection(asyncio.Protocol):
    """One WebSocket connection after the upgrade request: transport, protocol and ASGI app."""

    def __init__(self, conn: HTTPConnection, scope: dict[str, Any]) -> None:
        state: ServerState = conn.state
        config = conn.config
        self.state = state
        self.config = config
        self.loop = conn.loop
        self.transport: asyncio.Transport = conn.transport
        self.phase = HANDSHAKE
        self._http = conn  # until accept: its parser holds the bytes read past the handshake
        self.reading_paused = conn.reading_paused
        self.write_paused = conn.write_paused
        self.keep_alive_allowed = False  # read by the RequestCycle of a denial response
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._batch = WriteBatch(self.transport, self.loop, WRITE_BATCH)  # this turn's frames
        self._early: list[bytes] = []
        self._early_size = 0

        # The ASGI side.
        self.scope = _websocket_scope(scope)
        self.app = state.app
        self.task: asyncio.Task[None] | None = None
        self.cycle = self  # Server._drain looks for conn.cycle.task
        self._connect_delivered = False
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queue: int = config.ws_max_queue
        self._waiter: asyncio.Future[None] | None = None
        self._app_closed = False  # the app sent websocket.close (or we closed for it)
        self.disconnected = False
        self._disconnect: dict[str, Any] | None = None
        self._denial: RequestCycle | None = None
        self._retiring = False

        # The protocol side.
        # The request head is parsed already: the protocol starts OPEN, expecting frames.
        extensions = enable_server_permessage_deflate(None) if config.ws_per_message_deflate else None
        self.protocol = _ServerProtocol(extensions=extensions, max_size=config.ws_max_size, state=PROTOCOL_OPEN)
        self._fast_send = False  # set at accept: no extension negotiated
        self._fragments: list[Any] | None = None  # pieces of a fragmented message
        self._decoder: codecs.IncrementalDecoder | None = None
        self._fragment_text = False
        self._accept_key = ""
        self._extensions_header: str | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._close_timer: asyncio.TimerHandle | None = None

        # What the server's books (access log, request hooks) read when it ends.
        self.status = 0
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.bytes_sent = 0
        self.start_time = time.time()
        self.start_clock = time.perf_counter()
        self._finished = False
        state.connections.add(self)  # type: ignore[arg-type]  # same shutdown()/abort() surface
        state.active_requests += 1

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Refuse what must be refused over HTTP, else run the app."""
        state = self.state
        limit = self.config.limit_concurrency
        if limit is not None and state.active_requests > limit:
            self.send_error(503, "Service Unavailable")
        elif not state.accepting_requests:
            self.send_error(503, "Service Unavailable: the server is shutting down.")
        elif self._check_handshake():
            self.task = self.loop.create_task(  # --reset-contextvars: a fresh, empty context
                self._run_asgi(), context=Context() if self.config.reset_contextvars else None
            )

    def _check_handshake(self) -> bool:
        raw = self.scope["headers"]
        if [value for name, value in raw if name == b"sec-websocket-version"] != [b"13"]:
            self.send_error(
                426, "Unsupported WebSocket version: this server speaks version 13.",
                extra=b"sec-websocket-version: 13\r\n",
            )
            return False
        headers = Headers((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
        try:
            self._accept_key, self._extensions_header, _ = self.protocol.process_request(Request("/", headers))
        except InvalidHandshake as exc:
            self.send_error(400, f"Invalid WebSocket handshake: {exc}.")
            return False
        return True

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # never called: the transport is handed over by the HTTP connection

    def data_received(self, data: bytes) -> None:
        if self.phase == OPEN:
            self._receive(data)
        elif self.phase == HANDSHAKE:
            # A client may send frames right behind its handshake; keep them (bounded).
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > EARLY_DATA_LIMIT:
                self._pause_reading()

    def eof_received(self) -> bool | None:
        if self.phase == OPEN and not self.protocol.reader.eof:
            self.protocol.receive_eof()
            self._flush()
        return None  # close the transport: a WebSocket needs both directions

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self._cancel_timers()
        self._set_disconnected()
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        self._http = None  # type: ignore[assignment]
        self.state.connections.discard(self)  # type: ignore[arg-type]
        if not self._finished:
            self._finished = True
            if self._denial is not None:
                self.status = self._denial.status
                self.response_headers = self._denial.response_headers
                self.bytes_sent = self._denial.bytes_sent
            self.state.request_done(self)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- frames in --------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        for frame in events:
            if self._on_frame(frame):
                break
        self._flush()

    def _on_frame(self, frame: Frame) -> bool:
        """Handle one frame; True when the connection failed and later frames must be dropped."""
        opcode = frame.opcode
        if opcode is TEXT or opcode is BINARY or opcode is CONT:
            if frame.fin and self._fragments is None:
                if opcode is TEXT:
                    try:
                        message = {"type": "websocket.receive", "text": frame.data.decode()}
                    except UnicodeDecodeError:
                        return self._fail(1007, "invalid UTF-8 in a text message")
                else:
                    message = {"type": "websocket.receive", "bytes": bytes(frame.data)}
                self._deliver(message)
                return False
            return self._on_fragment(frame)
        if opcode is CLOSE:  # websockets has answered it and asks for the TCP connection closed
            self._fragments = self._decoder = None
            self._set_disconnected()
            self._wake()
        elif opcode is PONG and self._ping_payload is not None and frame.data == self._ping_payload:
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
        return False

    def _on_fragment(self, frame: Frame) -> bool:
        if self._fragments is None:  # first frame of a fragmented message
            self._fragments = []
            self._fragment_text = frame.opcode is TEXT
            self._decoder = _Utf8Decoder() if self._fragment_text else None
        if self._decoder is not None:
            try:
                self._fragments.append(self._decoder.decode(frame.data, frame.fin))
            except UnicodeDecodeError:
                return self._fail(1007, "invalid UTF-8 in a text message")
        else:
            self._fragments.append(frame.data)
        if frame.fin:
            pieces, self._fragments, self._decoder = self._fragments, None, None
            if self._fragment_text:
                self._deliver({"type": "websocket.receive", "text": "".join(pieces)})
            else:
                self._deliver({"type": "websocket.receive", "bytes": b"".join(pieces)})
        return False

    def _deliver(self, message: dict[str, Any]) -> None:
        queue = self._queue
        queue.append(message)
        if len(queue) >= self._max_queue:
            self._pause_reading()
        self._wake()

    def _fail(self, code: int, reason: str) -> bool:
        """Fail the connection (RFC 6455 7.1.7): close frame, then close TCP; no more input."""
        self.protocol.fail(code, reason)
        self._set_disconnected()
        self._wake()
        return True

    # -- bytes out --------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write everything the protocol produced in one write; close TCP when it says so."""
        writes = self.protocol.data_to_send()
        if not writes:
            return
        eof = not writes[-1]  # websockets.protocol.SEND_EOF == b""
        for data in writes:
            if data:
                self._batch.add(data)
        if eof and self.phase != CLOSED:  # the connection is over, whoever ended it: tell the app now
            self._batch.flush()
            self._cancel_timers()
            self.transport.close()
            self._set_disconnected()
            self._wake()

    def write(self, data: bytes) -> None:
        """For the RequestCycle of a denial response: now, after what write_soon() batched."""
        if self.phase != CLOSED:
            self._batch.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        """For the RequestCycle of a denial response: a large piece, by reference."""
        if self.phase != CLOSED:
            self._batch.write(*parts)

    def write_soon(self, data: bytes) -> None:
        """For the RequestCycle of a denial response: a streamed piece of its body."""
        if self.phase != CLOSED:
            self._batch.add(data)

    async def drain(self) -> None:
        if self.write_paused and self.phase != CLOSED:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def send_error(self, status: int, reason: str, cycle: RequestCycle | None = None, extra: bytes = b"") -> None:
        """An HTTP answer instead of the upgrade; the connection closes after it."""
        self.write(error_response(status, reason, self.state.head_defaults(None), extra))
        self.status = status
        self.bytes_sent = len(reason.encode())
        self._denial = None
        self._close_transport()

    def on_response_complete(self, cycle: RequestCycle) -> None:
        self._close_transport()

    def abort_response(self, cycle: RequestCycle) -> None:
        self._close_transport()

    def _close_transport(self) -> None:
        if self.phase != CLOSED:
            self._batch.flush()
            self.phase = DENIAL if self.phase == HANDSHAKE else self.phase
            self._cancel_timers()
            self.transport.close()

    # -- flow control -------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self.reading_paused and self.phase != CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()
            # A pong may now be stuck behind unread data: the client is not late.
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None

    def _resume_reading(self) -> None:
        if self.reading_paused and self.phase == OPEN:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- ASGI -------------------------------------------------------------------------------
    async def _run_asgi(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, ClientDisconnected) or (self.disconnected and isinstance(exc, OSError)):
                return
            if isinstance(exc, asyncio.CancelledError):
                self._close_transport()
                raise
            logger.error("Exception in ASGI application", exc_info=exc)
            self._app_failed()
            if not isinstance(exc, Exception):
                raise
        else:
            if self.phase == HANDSHAKE and not self.disconnected:
                logger.error("ASGI callable returned without accepting or rejecting the WebSocket connection.")
                self.send_error(500, "Internal Server Error")
            elif self.phase == DENIAL and self._denial is not None and not self._denial.response_complete:
                logger.error("ASGI callable returned without completing the WebSocket denial response.")
                self._app_failed()
            elif self.phase == OPEN and not self._app_closed:
                self._close(1000, "")

    def _app_failed(self) -> None:
        phase = self.phase
        if phase == HANDSHAKE:
            self.send_error(500, "Internal Server Error")
        elif phase == DENIAL:
            denial = self._denial
            if denial is not None and not denial.response_complete:
                if not denial.response_started or denial.head:  # nothing written yet
                    self.send_error(500, "Internal Server Error")
                else:
                    self._close_transport()
        elif phase == OPEN and not self._app_closed:
            self._close(1011, "")

    async def receive(self) -> dict[str, Any]:
        if not self._connect_delivered:
            self._connect_delivered = True
            return {"type": "websocket.connect"}
        queue = self._queue
        while not queue:
            if self._disconnect is not None:
                return self._disconnect
            self._waiter = self.loop.create_future()
            await self._waiter
        message = queue.popleft()
        if self.reading_paused and len(queue) <= self._max_queue // 4 and self._early_size <= EARLY_DATA_LIMIT:
            self._resume_reading()
        return message

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        phase = self.phase
        if phase == OPEN and kind == "websocket.send" and not self._app_closed:
            if self.disconnected:
                raise ClientDisconnected("the WebSocket client has disconnected")
            await self._send_data(message)
        elif self.disconnected or phase == CLOSED:
            raise ClientDisconnected("the WebSocket client has disconnected")
        elif phase == HANDSHAKE:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self.send_error(403, "Forbidden")
            elif kind == "websocket.http.response.start":
                self.phase = DENIAL
                self._denial = RequestCycle(self, _DENIAL_SCOPE, False, False)  # type: ignore[arg-type]
                await self._denial.send({**message, "type": "http.response.start"})
            else:
                raise RuntimeError(f"Unexpected ASGI message {kind!r} before the WebSocket handshake")
        elif phase == DENIAL and kind == "websocket.http.response.body" and self._denial is not None:
            await self._denial.send({**message, "type": "http.response.body"})
        elif phase == OPEN and kind == "websocket.close" and not self._app_closed:
            code = message.get("code")
            self._close(1000 if code is None else code, message.get("reason") or "")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} in this state of the WebSocket connection")

    def _accept(self, message: dict[str, Any]) -> None:
        subprotocol = message.get("subprotocol")
        headers = message.get("headers") or ()
        extra = []
        for name, value in headers:
            if not _TOKEN(name):
                raise RuntimeError(f"Invalid HTTP header name {name!r}")
            if _BAD_VALUE(value):
                raise RuntimeError(f"Invalid HTTP header value {value!r}")
            extra.append(b"%s: %s\r\n" % (name, value))
        parts = [
            _SWITCHING,
            self.state.head_defaults(headers or None),
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: %s\r\n" % self._accept_key.encode(),
        ]
        if self._extensions_header is not None:
            parts.append(b"sec-websocket-extensions: %s\r\n" % self._extensions_header.encode())
        if subprotocol is not None:
            if not (isinstance(subprotocol, str) and subprotocol.isascii() and _TOKEN(subprotocol.encode())):
                raise RuntimeError(f"Invalid WebSocket subprotocol {subprotocol!r}")
            self.protocol.subprotocol = subprotocol  # type: ignore[assignment]
            parts.append(b"sec-websocket-protocol: %s\r\n" % subprotocol.encode())
        parts.extend(extra)
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))
        self.status = 101
        self.response_headers = list(headers)
        self.phase = OPEN
        self._fast_send = not self.protocol.extensions

        # The first frames: what the HTTP parser read past the handshake, then what came since.
        early = self._http.parser.trailing_data
        self._http = None  # type: ignore[assignment]
        if self._early:
            early += b"".join(self._early)
            self._early.clear()
        self._early_size = 0
        if early:
            self._receive(early)
        if len(self._queue) < self._max_queue:
            self._resume_reading()
        if self._retiring:
            self._close(RETIRE_CODE, "")
        elif self.config.ws_ping_interval:
            self._ping_timer = self.loop.call_later(self.config.ws_ping_interval, self._ping)

    async def _send_data(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is not None:
            data = text.encode()
            opcode = 0x81
        else:
            data = message.get("bytes")
            if data is None:
                raise RuntimeError("A websocket.send message needs 'bytes' or 'text'")
            opcode = 0x82
        if self.protocol.state is not PROTOCOL_OPEN:  # closing: the client's close, or a failure
            raise ClientDisconnected("the WebSocket connection is closing")
        if self._fast_send:
            # No extension to apply: a server frame is a header and the unmasked payload.
            length = len(data)
            if length < 126:
                self._batch.add(bytes((opcode, length)) + data)
            elif length < 65536:
                self._batch.add(_pack_short(opcode, 126, length) + data)
            else:  # large: batched by reference (immutable bytes only), not copied next to its header
                self._batch.add(_pack_long(opcode, 127, length))
                self._batch.add(data if type(data) is bytes else bytes(data))
        else:
            if opcode == 0x81:
                self.protocol.send_text(data)
            else:
                self.protocol.send_binary(data)
            self._flush()
        self.bytes_sent += len(data)
        if self.write_paused:
            await self.drain()

    def _close(self, code: int, reason: str) -> None:
        """Start the close handshake; the client's close frame (or a timeout) ends it."""
        protocol = self.protocol
        if protocol.state is PROTOCOL_OPEN and self.phase == OPEN:
            protocol.send_close(code, reason)  # raises for a code or reason a close frame cannot carry
            self._flush()
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)
        self._app_closed = True

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.phase != CLOSED:
            self.transport.abort()

    def _set_disconnected(self) -> None:
        if self._disconnect is not None:
            return
        # The peer's close frame; else the one we failed the connection with; else none at all.
        close = self.protocol.close_rcvd or self.protocol.close_sent
        code, reason = (close.code, close.reason) if close is not None else (1006, "")
        self.disconnected = True
        self._disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}

    # -- keepalive ------------------------------------------------------------------------------
    def _ping(self) -> None:
        interval = self.config.ws_ping_interval
        self._ping_timer = self.loop.call_later(interval, self._ping)
        if self._ping_payload is not None or self.reading_paused or self.protocol.state is not PROTOCOL_OPEN:
            return
        payload = os.urandom(4)
        self._ping_payload = payload
        self.protocol.send_ping(payload)
        self._flush()
        timeout = self.config.ws_ping_timeout
        if timeout:
            self._pong_timer = self.loop.call_later(timeout, self._pong_missing)

    def _pong_missing(self) -> None:
        self._pong_timer = None
        if self.phase == OPEN and self.protocol.state is PROTOCOL_OPEN:
            self._fail(1011, "keepalive ping timeout")
            self._flush()

    def _cancel_timers(self) -> None:
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._close_timer = None

    # -- lifecycle ----------------------------------------------------------------------------
    deadline = 0.0  # the server's deadline sweep skips us: our timers are the loop's

    def check_deadline(self, now: float) -> None:
        pass

    def shutdown(self) -> None:
        """Retire: close an open WebSocket with 1012; one still handshaking closes on accept."""
        self._retiring = True
        if self.phase == OPEN and not self._app_closed:
            self._close(RETIRE_CODE, "")

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.phase = CLOSED
        self._cancel_timers()
        self.transport.abort()


_DENIAL_SCOPE = {"method": "GET", "http_version": "1.1"}


def _websocket_scope(http_scope: dict[str, Any]) -> dict[str, Any]:
    """The HTTP scope of the upgrade request, turned into an ASGI websocket scope (spec 2.4)."""
    scope = dict(http_scope)
    del scope["method"]
    scope["type"] = "websocket"
    scope["scheme"] = "wss" if http_scope["scheme"] in ("https", "wss") else "ws"
    scope["subprotocols"] = [
        token.strip()
        for name, value in http_scope["headers"]
        if name == b"sec-websocket-protocol"
        for token in value.decode("latin-1").split(",")
        if token.strip()
    ]
    scope["extensions"] = {"websocket.http.response": {}}
    return scope
