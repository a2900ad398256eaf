"""WebSocket connections: the ASGI ``websocket`` scope on the ``websockets`` sans-I/O protocol.

The ``websockets`` protocol object (reached only through ``wsproto.py``) does RFC 6455 and
7692. This module is the bridge between that object, the asyncio transport and the ASGI
application: it moves bytes, runs timers and turns frames into ASGI messages and back.

Theory of operation. The HTTP/1.1 connection recognises an upgrade request (a GET HTTP/1.1
request with ``Connection: upgrade`` and ``Upgrade: websocket``) and calls
:func:`start_handshake` with the scope it built, so the head is not parsed twice. The
:class:`WebSocketConnection` runs the app at once; until the handshake ends, everything that
is HTTP stays with the HTTP connection (``HTTPSide``), which keeps the transport:

    phase      the transport belongs to      left by
    ---------  ----------------------------  ------------------------------------------------
    HANDSHAKE  the HTTP connection: bytes    websocket.accept → OPEN: 101 sent, transport
               behind the handshake are      handed over; websocket.close → 403; an app
               held there, bounded           error → 500; a denial response → the HTTP
                                             connection serves it as a request (then closes)
    OPEN       this connection: frames →     the close handshake or a failure → CLOSED
               messages and back
    CLOSED     —                             —

Rules this module keeps:

* Received messages wait in a queue of at most ``ws_max_queue`` messages for the app's
  ``receive()``; when it is full the connection stops reading (backpressure), so a client that
  floods an app that does not read cannot grow server memory without bound. While reading is
  paused no keepalive ping is outstanding: an app that is slow is not the client's fault.
* Outgoing frames are batched per loop turn (``batch.py``, through ``Connection``): the
  echoes of every message one read delivered, pongs, a close frame go out in one write; large
  payloads by reference. Data messages on a connection without extensions skip the protocol
  object: the frame header is built here.
* Text is checked for UTF-8 frame by frame (an incremental decoder), so an invalid fragment
  fails the connection (1007) without waiting for the end of the message.
* Close codes: the app's ``websocket.close`` code; 1011 when the app raises after accepting
  or when a keepalive ping gets no pong in time; 1012 when the server retires; 1000 when the
  app returns with the connection still open; protocol errors from the client 1002, 1007,
  1009 (decided by ``websockets``). ``websocket.disconnect`` carries the peer's close code and
  reason, or the code we failed the connection with, or 1006 when the TCP connection was
  lost without a close frame.
* The session is one request for the server's books: it counts against ``limit_concurrency``
  while open, and is reported to ``request_done`` once, when it ends (by the HTTP connection
  if it ended over HTTP).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import struct
import time
from collections import deque
from contextvars import Context
from typing import TYPE_CHECKING, Any, Protocol

from uvworker.core.response import header_line, is_token
from uvworker.errors import ClientDisconnected
from uvworker.protocols import wsproto
from uvworker.protocols.connection import CLOSED, Connection, ServerState, cancel_app

if TYPE_CHECKING:
    from uvworker.protocols.cycle import RequestCycle

logger = logging.getLogger("uvworker.error")

HANDSHAKE, OPEN = 1, 2
WRITE_BATCH = 256 * 1024  # outgoing bytes held for one write before they are written at once
CLOSE_TIMEOUT = 10.0  # how long we wait for the client's close frame after sending ours
RETIRE_CODE = 1012  # "service restart": the client should reconnect, to another worker

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\n"

_warned = False


class HTTPSide(Protocol):
    """What the HTTP/1.1 connection does for a handshake in progress."""

    state: ServerState
    transport: asyncio.Transport
    write_paused: bool

    def refuse_handshake(self, record: Any, status: int, reason: str, extra: bytes = b"") -> None: ...
    def start_denial(self, record: Any) -> RequestCycle: ...
    def hand_over(self, ws: WebSocketConnection) -> bytes: ...


def new_session(http: HTTPSide, scope: dict[str, Any]) -> WebSocketConnection | None:
    """The session of an upgrade request (its ``start()`` runs the app); None (serve the
    request as HTTP) without ``websockets``.

    ``scope`` is the HTTP scope of the upgrade request (path, client, proxy headers applied);
    it becomes the websocket scope."""
    global _warned
    if not wsproto.AVAILABLE:
        if http.state.config.ws == "websockets" and not _warned:
            _warned = True
            logger.error("--ws websockets needs the websockets package: pip install 'uvworker[standard]'")
        return None
    return WebSocketConnection(http.state, http, scope)


class WebSocketConnection(Connection):
    """One WebSocket session: the ASGI app, the protocol object, and (once open) the transport."""

    finished = False  # reported to the server's books
    websocket = True

    def __init__(self, state: ServerState, http: HTTPSide, scope: dict[str, Any]) -> None:
        super().__init__(state)
        config = state.config
        self.phase = HANDSHAKE
        self._http: HTTPSide | None = http  # until the handshake ends

        # The ASGI side.
        self.scope = _websocket_scope(scope)
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
        self.protocol = wsproto.new_protocol(config.ws_max_size, config.ws_per_message_deflate)
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

    # -- the handshake -----------------------------------------------------------------------
    def start(self) -> None:
        """Refuse over HTTP what must be refused, else run the app."""
        state, http = self.state, self._http
        assert http is not None
        limit = self.config.limit_concurrency
        if limit is not None and state.active_requests > limit:
            if state.counters is not None:
                state.counters.shed += 1
            http.refuse_handshake(self, 503, "Service Unavailable")
        elif not state.accepting_requests:
            http.refuse_handshake(self, 503, "Service Unavailable: the server is shutting down.")
        elif self._check_handshake(http):
            # --reset-contextvars: a fresh, empty context
            context = Context() if self.config.reset_contextvars else None
            self.task = self.loop.create_task(self._run_asgi(), context=context)
            return
        wsproto.release(self.protocol)  # refused before the app: no frame comes

    def _check_handshake(self, http: HTTPSide) -> bool:
        raw = self.scope["headers"]
        if [value for name, value in raw if name == b"sec-websocket-version"] != [b"13"]:
            http.refuse_handshake(
                self, 426, "Unsupported WebSocket version: this server speaks version 13.",
                extra=b"sec-websocket-version: 13\r\n",
            )
            return False
        try:
            self._accept_key, self._extensions_header = wsproto.check_handshake(self.protocol, raw)
        except wsproto.HandshakeError as exc:
            http.refuse_handshake(self, 400, f"Invalid WebSocket handshake: {exc}.")
            return False
        return True

    def _refuse(self, status: int, reason: str) -> None:
        """End the handshake with an HTTP answer (the app sees a disconnect from now on)."""
        http, self._http = self._http, None
        self._set_disconnected(1006)
        if http is not None:
            http.refuse_handshake(self, status, reason)

    def in_flight(self) -> tuple[Any, ...]:
        return () if self.finished else (self,)

    def handshake_lost(self) -> None:
        """The client went away before the handshake ended."""
        self._http = None
        self._set_disconnected(1006)
        self._wake()

    def retire(self) -> None:
        """The server retires: an open session closes with 1012 (one still handshaking at accept)."""
        self._retiring = True
        if self.phase == OPEN and not self._app_closed:
            self._close(RETIRE_CODE, "")

    def _accept(self, message: dict[str, Any]) -> None:
        http = self._http
        assert http is not None
        subprotocol = message.get("subprotocol")
        headers = message.get("headers") or ()
        parts = [
            _SWITCHING,
            self.state.defaults.without(headers) if headers else self.state.defaults.encoded,
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: %s\r\n" % self._accept_key.encode(),
        ]
        if self._extensions_header is not None:
            parts.append(b"sec-websocket-extensions: %s\r\n" % self._extensions_header.encode())
        if subprotocol is not None:
            if not (isinstance(subprotocol, str) and subprotocol.isascii() and is_token(subprotocol.encode())):
                raise RuntimeError(f"Invalid WebSocket subprotocol {subprotocol!r}")
            self.protocol.subprotocol = subprotocol
            parts.append(b"sec-websocket-protocol: %s\r\n" % subprotocol.encode())
        parts.extend(header_line(name, value)[0] for name, value in headers)
        parts.append(b"\r\n")

        # The transport is ours from here on; the first frames are what arrived behind the head.
        self._http = None
        self.write_paused = http.write_paused
        early = http.hand_over(self)
        self.attach(http.transport, WRITE_BATCH)
        http.transport.set_protocol(self)
        self.batch.write(b"".join(parts))
        self.status = 101
        self.response_headers = list(headers)
        self.phase = OPEN
        self._fast_send = not self.protocol.extensions
        if early:
            self._receive(early)
        if self._retiring:
            self._close(RETIRE_CODE, "")
        elif self.config.ws_ping_interval:
            self._ping_timer = self.loop.call_later(self.config.ws_ping_interval, self._ping)

    # -- asyncio.Protocol (once open) ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # never called: the transport is handed over by the HTTP connection

    def data_received(self, data: bytes) -> None:
        counters = self.state.counters
        if counters is not None:
            counters.received += len(data)
        if self.phase == OPEN:
            self._receive(data)

    def eof_received(self) -> bool | None:
        if self.phase == OPEN and not self.protocol.reader.eof:
            self.protocol.receive_eof()
            self._flush()
        return None  # close the transport: a WebSocket needs both directions

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_timers()
        self._set_disconnected()
        self._wake()
        self.state.request_done(self)
        wsproto.release(self.protocol)

    # -- frames in --------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        for frame in events:
            if self._on_frame(frame):
                break
        self._flush()

    def _on_frame(self, frame: wsproto.Frame) -> bool:
        """Handle one frame; True when the connection failed and later frames must be dropped."""
        opcode = frame.opcode
        if opcode is wsproto.TEXT or opcode is wsproto.BINARY or opcode is wsproto.CONT:
            if frame.fin and self._fragments is None:
                if opcode is wsproto.TEXT:
                    try:
                        message = {"type": "websocket.receive", "text": frame.data.decode()}
                    except UnicodeDecodeError:
                        return self._fail(1007, "invalid UTF-8 in a text message")
                else:
                    message = {"type": "websocket.receive", "bytes": bytes(frame.data)}
                self._deliver(message)
                return False
            return self._on_fragment(frame)
        if opcode is wsproto.CLOSE:  # websockets has answered it and asks for the TCP connection closed
            self._fragments = self._decoder = None
            self._set_disconnected()
            self._wake()
        elif opcode is wsproto.PONG and self._ping_payload is not None and frame.data == self._ping_payload:
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
        return False

    def _on_fragment(self, frame: wsproto.Frame) -> bool:
        if self._fragments is None:  # first frame of a fragmented message
            self._fragments = []
            self._fragment_text = frame.opcode is wsproto.TEXT
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
                self.batch.add(data)
        if eof and self.phase != CLOSED:  # the connection is over, whoever ended it: tell the app now
            self._cancel_timers()
            Connection.close(self)  # bounded: a client that takes nothing is dropped (--timeout-send)
            self._set_disconnected()
            self._wake()
            self._release_writers()  # a send() waiting for a client that stopped reading returns

    # -- flow control -------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self.reading_paused and self.phase != CLOSED:
            self.pause_reading()
            # A pong may now be stuck behind unread data: the client is not late.
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None

    # -- ASGI -------------------------------------------------------------------------------
    async def _run_asgi(self) -> None:
        try:
            await self.state.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, ClientDisconnected) or (self.disconnected and isinstance(exc, OSError)):
                return
            if isinstance(exc, asyncio.CancelledError):
                self._app_failed(quietly=True)
                raise
            logger.error("Exception in ASGI application", exc_info=exc)
            self._app_failed()
            if not isinstance(exc, Exception):
                raise
        else:
            if self.phase == HANDSHAKE and self._http is not None:
                logger.error("ASGI callable returned without accepting or rejecting the WebSocket connection.")
                self._refuse(500, "Internal Server Error")
            elif self._denial is not None and not self._denial.response_complete:
                logger.error("ASGI callable returned without completing the WebSocket denial response.")
                self._app_failed()
            elif self.phase == OPEN and not self._app_closed:
                self._close(1000, "")
        finally:
            if self.phase == HANDSHAKE:  # never opened (refused, denied, lost): no frame comes
                wsproto.release(self.protocol)

    def _app_failed(self, quietly: bool = False) -> None:
        if self._denial is not None:
            self._denial._fail()  # a 500 if nothing is out yet, else the connection is cut
        elif self.phase == HANDSHAKE:
            self._refuse(500, "Internal Server Error")
        elif self.phase == OPEN and not self._app_closed:
            if quietly:
                self._cancel_timers()
                Connection.close(self)
            else:
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
        if self.reading_paused and len(queue) <= self._max_queue // 4:
            self.resume_reading()
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
        elif self._denial is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"Unexpected ASGI message {kind!r} during a WebSocket denial response")
            await self._denial.send({**message, "type": "http.response.body"})
        elif self.disconnected or phase == CLOSED:
            raise ClientDisconnected("the WebSocket client has disconnected")
        elif phase == HANDSHAKE:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._refuse(403, "Forbidden")
            elif kind == "websocket.http.response.start":
                assert self._http is not None
                http, self._http = self._http, None
                self.finished = True  # the denial response is the request's record
                self._set_disconnected(1006)  # receive() has nothing more to give
                self._denial = http.start_denial(self)
                await self._denial.send({**message, "type": "http.response.start"})
            else:
                raise RuntimeError(f"Unexpected ASGI message {kind!r} before the WebSocket handshake")
        elif phase == OPEN and kind == "websocket.close" and not self._app_closed:
            code = message.get("code")
            self._close(1000 if code is None else code, message.get("reason") or "")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} in this state of the WebSocket connection")

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
        if self.protocol.state is not wsproto.OPEN:  # closing: the client's close, or a failure
            raise ClientDisconnected("the WebSocket connection is closing")
        if self._fast_send:
            # No extension to apply: a server frame is a header and the unmasked payload.
            length = len(data)
            batch = self.batch
            if length < 126:
                batch.add(bytes((opcode, length)) + data)
            elif length < 65536:
                batch.add(_pack_short(opcode, 126, length) + data)
            else:  # large: batched by reference (immutable bytes only), not copied next to its header
                batch.add(_pack_long(opcode, 127, length))
                batch.add(data if type(data) is bytes else bytes(data))
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
        if protocol.state is wsproto.OPEN and self.phase == OPEN:
            protocol.send_close(code, reason)  # raises for a code or reason a close frame cannot carry
            self._flush()
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)
        self._app_closed = True

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.phase != CLOSED:
            self.transport.abort()

    def _set_disconnected(self, code: int | None = None) -> None:
        if self._disconnect is not None:
            return
        # The peer's close frame; else the one we failed the connection with; else none at all.
        close = self.protocol.close_rcvd or self.protocol.close_sent
        if code is None and close is not None:
            code, reason = close.code, close.reason
        else:
            code, reason = code or 1006, ""
        self.disconnected = True
        self._disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}

    # -- keepalive ------------------------------------------------------------------------------
    def _ping(self) -> None:
        interval = self.config.ws_ping_interval
        self._ping_timer = self.loop.call_later(interval, self._ping)
        if self._ping_payload is not None or self.reading_paused or self.protocol.state is not wsproto.OPEN:
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
        if self.phase == OPEN and self.protocol.state is wsproto.OPEN:
            self._fail(1011, "keepalive ping timeout")
            self._flush()

    def _cancel_timers(self) -> None:
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._close_timer = None

    # -- lifecycle ----------------------------------------------------------------------------
    def shutdown(self, close_idle: bool = False) -> None:
        self.retire()

    def abort(self) -> None:
        if self.task is not None:
            cancel_app(self.task)
        self._cancel_timers()
        if self.phase != HANDSHAKE:  # open, or closed with its last frames still going out
            self.drop()
        self.phase = CLOSED


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
    tls = http_scope.get("extensions", {}).get("tls")
    if tls is not None:  # a wss:// connection
        scope["extensions"]["tls"] = tls
    return scope
