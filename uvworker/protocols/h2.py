"""The HTTP/2 transport: one connection, many streams, each carrying one request's ASGI cycle.

The h2 package is the state machine (frames, HPACK, stream states, windows); ``core.h2`` adds
the scope, the response head and the flood and header-block bounds. This module moves bytes,
runs the deadlines and the flow control, and gives each stream's ``RequestCycle`` its
``Stream`` (:class:`H2Stream`). A connection arrives here from ``HTTPConnection``: at once
when TLS negotiated ``h2`` by ALPN, or when a cleartext connection opens with the HTTP/2
connection preface (h2c with prior knowledge).

Rules this module keeps:

* Input is read whole and handed to h2; the events it returns are acted on in order; what
  h2 and the streams produce goes out in one write per loop turn.
* Request body, both windows: a stream's window (``STREAM_WINDOW``) is reopened only as the
  app takes its body (``body_consumed``), so a stream whose app does not read holds at most
  that much, and the connection at most ``CONNECTION_WINDOW``, whatever the client sends.
  Body the app will never read (its response is complete, or it is gone) is acknowledged at
  once, and the stream is reset with NO_ERROR so the client stops sending it.
* Response body: sent as far as the peer's windows allow; the rest waits in the stream, and
  the app's ``send()`` waits (``drain``) until it has gone. A peer that opens no window for
  ``--timeout-send`` while we wait to send is dropped, as is one that stops reading the socket.
* Streams the connection runs at once are bounded by ``--http2-max-concurrent-streams``
  (advertised; h2 enforces it once the client acknowledged our SETTINGS, and streams still
  running their app after a reset count too: beyond it a stream is refused, REFUSED_STREAM).
* Frames that cost work and give nothing back (resets of streams we started, PING,
  SETTINGS, PRIORITY, empty DATA, unknown frames) spend a ``FloodBudget``; responses earn it
  back. An empty budget ends the connection: GOAWAY with ENHANCE_YOUR_CALM.
* Deadlines, checked by the server's sweep: a connection without streams is closed (GOAWAY,
  NO_ERROR) after the header timeout while it has served nothing yet (a stalled preface), the
  keep-alive timeout after that; a stream whose app waits for body that stalls gets 408 (or a
  reset once its response began).
* Retiring: the streams opened so far are the last the connection takes; later ones are
  ignored (not started). GOAWAY naming the last one taken is sent once those are done (clients
  such as httpx fail the streams in flight when a GOAWAY arrives) or the keep-alive timeout
  after the retirement began, whichever comes first; the client retries the ignored streams
  elsewhere, as GOAWAY tells it it may. So a connection that always has a stream in flight
  is told as soon as the streams it had then are answered. Then the connection waits for the
  client to close it, for at most ``LINGER_TIME``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, PingReceived, PriorityUpdated, RemoteSettingsChanged, RequestReceived,
    StreamEnded, StreamReset, UnknownFrameReceived, WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import Settings, SettingCodes
from hyperframe.frame import GoAwayFrame

from uvworker.core.h2 import (
    EXTENSIONS, NO_BODY_STATUSES, check_pair, BoundedFrameBuffer, FieldDecoder, FloodBudget, H2State, ResponseHead,
    StatelessEncoder, request_scope,
)
from uvworker.core.tls import tls_extension
from uvworker.errors import HTTPError
from uvworker.protocols.connection import CLOSED, LINGER_TIME, Connection, ServerState, address, cancel_app
from uvworker.protocols.cycle import RequestCycle
from uvworker.proxy import PROXY_EXTENSION

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("uvworker.error")

# LINGER: GOAWAY sent, nothing in flight, waiting for the client's close. DISCARD: after a
# connection error, our side is shut; input is dropped until the client's FIN.
OPEN, GOING_AWAY, LINGER, DISCARD = 1, 2, 3, 4
STREAM_WINDOW = 256 * 1024  # request body a stream may hold that its app has not taken
CONNECTION_WINDOW = 1024 * 1024  # ... and all the streams of a connection together
WRITE_BATCH = 256 * 1024
FILE_CHUNK = 64 * 1024  # a file body (pathsend) is read in pieces this big
LINGER_BYTES = 1024 * 1024
FLOOD_RATE = 40.0  # unproductive frames forgiven per second

H2_CONFIG = H2Configuration(
    client_side=False, header_encoding=None,
    # Our response headers are checked once per distinct pair (core.h2.ResponseHead).
    validate_outbound_headers=False, normalize_outbound_headers=False,
)


class _LocalSettings(Settings):
    """Our SETTINGS as sent, except that h2 itself does not enforce MAX_CONCURRENT_STREAMS: it
    would end the whole connection (PROTOCOL_ERROR) for one stream too many, where RFC 9113
    §5.1.2 asks for a stream error. The connection refuses that stream (REFUSED_STREAM)."""

    @property
    def max_concurrent_streams(self) -> int:  # type: ignore[override]
        return 2**31 - 1


class H2Stream:
    """One stream: the cycle's ``Stream``."""

    # Class-level defaults: a stream stores only what differs (hot path).
    cycle: RequestCycle | None = None
    head: list[tuple[bytes, bytes]] | None = None  # the response head, until the first body piece
    remaining: int | None = None  # the app's Content-Length, counting down
    no_body = False
    head_method = False
    out: list[bytes | memoryview] | tuple[()] = ()  # response body the peer's windows do not take yet
    out_end = False  # ... and the END_STREAM after it
    ended = False  # END_STREAM (or a reset) is out: nothing more to send
    body_ended = False  # the client's END_STREAM arrived
    deadline = 0.0  # the body the app waits for stalls after this (loop time)
    record: Any = None  # what is counted and logged when the stream finishes
    finished = False
    head_sent = False
    trailers: list[tuple[bytes, bytes]] | None = None  # to send after the body (trailing HEADERS)
    _waiters: list[asyncio.Future[None]] | tuple[()] = ()

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.loop = conn.loop

    @property
    def write_paused(self) -> bool:  # type: ignore[override]
        return bool(self.out) or self.conn.write_paused

    # -- the cycle's stream ------------------------------------------------------------------
    def send_continue(self) -> None:
        if not self.ended and not self.body_ended:
            self.conn.h2.send_headers(self.id, [(b":status", b"100")])
            self.conn.flush_soon()

    def want_body(self) -> None:
        if not self.deadline and not self.body_ended:
            self.deadline = self.conn.set_deadline(self.conn.config.timeout_request_body)

    def pause_body(self) -> None:
        self.deadline = 0.0  # the window bounds the body; the app's pause is not the client's fault

    def body_consumed(self, size: int) -> None:
        if not self.body_ended and not self.ended and self.conn.phase != CLOSED:
            self.conn.h2.acknowledge_received_data(size, self.id)
            self.conn.flush_soon()

    def send_start(self, status: int, headers: Any) -> None:
        head, self.remaining = self.conn.head.encode(status, headers)
        if status in NO_BODY_STATUSES or self.head_method:
            self.no_body = True
            if status == 204 and self.remaining is not None:  # RFC 9110 §8.6: none in a 204
                head = [pair for pair in head if pair[0] != b"content-length"]
        self.head = head

    def send_body(self, cycle: RequestCycle, body: bytes, more: bool) -> None:
        if self.ended:
            if not more:
                self.finish()
            return
        head = self.head
        size = len(body)
        remaining = self.remaining
        if self.no_body:
            if head is not None:
                self.head = None
                self._send_head(head, True)
            if not more:
                self.finish()
            return
        if remaining is not None:
            self.remaining = remaining - size
            if size > remaining or (not more and size < remaining):
                self._length_error(cycle, head, body[:remaining])
        if head is not None:
            self.head = None
            if not more and remaining is None:
                head.append((b"content-length", b"%d" % size))
            self._send_head(head, False)
        cycle.bytes_sent += size
        if type(body) is not bytes:
            body = bytes(body)  # the app may reuse a bytearray once send() returns
        if self.out:
            if size:
                self.out.append(body)  # type: ignore[union-attr]
            self.out_end = not more
        elif size or not more:
            self.out = [body] if size or self.trailers is None else []
            self.out_end = not more
            self.push()

    def send_early_hint(self, links: list[bytes]) -> None:
        """103 Early Hints: an informational HEADERS before the response's own."""
        if not self.head_sent:
            self.conn.h2.send_headers(self.id, [(b":status", b"103"), *((b"link", link) for link in links)])
            self.conn.flush_soon()

    def send_trailers(self, cycle: RequestCycle, headers: Any) -> None:
        """Trailing HEADERS (HTTP/2 always has room for them) after the body, ending the stream."""
        try:
            fields = [pair for pair in (check_pair(*field) for field in headers) if pair is not None]
        except RuntimeError:
            self.reset(ErrorCodes.INTERNAL_ERROR)  # the body is out without its trailers: cut
            raise
        self.trailers = [(name, value) for name, value, _ in fields]
        self.send_body(cycle, b"", False)

    async def send_file(self, cycle: RequestCycle, fd: int, size: int, more: bool) -> None:
        """The first ``size`` bytes of the file at ``fd``, in FILE_CHUNK pieces read as the
        windows take them (memory stays at a piece or two, whatever the size)."""
        if self.head is not None and self.remaining is None:  # framed by the size (HEAD too)
            self.head.append((b"content-length", b"%d" % size))
            self.remaining = size
        offset = 0
        while offset < size and not self.ended and not self.no_body:
            piece = os.pread(fd, min(FILE_CHUNK, size - offset), offset)
            if not piece:
                break  # the file shrank: the length check below cuts the response
            offset += len(piece)
            self.send_body(cycle, piece, more or offset < size)
            self.conn.flush()  # into the transport now: its high-water mark pauses us (drain)
            if self.write_paused:
                await self.drain()
        if offset < size or self.no_body:
            self.send_body(cycle, b"", more)

    def _send_head(self, head: list[tuple[bytes, bytes]], end: bool) -> None:
        conn = self.conn
        self.head_sent = True
        conn.h2.send_headers(self.id, head, end_stream=end)
        conn.flush_soon()
        if end:
            self.ended = True

    def _length_error(self, cycle: RequestCycle, head: Any, allowed: bytes) -> None:
        """The body contradicts the app's Content-Length: a 500 if nothing is out, else the
        declared bytes at most, then a reset (a client must not take it for a whole body)."""
        cycle.response_complete = True
        if head is not None:
            cycle.status = 500
            self.head = None
            self.send_error(500, "Internal Server Error")
        else:
            if allowed and not self.out:
                self.out = [allowed]
                self.push()
            self.reset(ErrorCodes.INTERNAL_ERROR)
        raise RuntimeError("Response body does not match the Content-Length header")

    async def drain(self) -> None:
        if (self.out or self.conn.write_paused) and not self.ended and self.conn.phase != CLOSED:
            waiter = self.loop.create_future()
            if not self._waiters:
                self._waiters = []
            self._waiters.append(waiter)  # type: ignore[union-attr]
            await waiter

    def fail(self, cycle: RequestCycle) -> None:
        if self.ended or self.conn.phase == CLOSED:
            self.finish()
            return
        self.answer_or_cut(cycle, 500, "Internal Server Error", ErrorCodes.INTERNAL_ERROR)

    def answer_or_cut(self, cycle: RequestCycle, status: int, reason: str, code: int = ErrorCodes.CANCEL) -> None:
        """End a response the app did not complete: ``status`` when nothing is out yet, else
        a reset (a client must never take a partial response for a whole one)."""
        cycle.response_complete = True
        if self.head is not None or not cycle.response_started:
            cycle.response_started = True
            cycle.status = status
            self.head = None
            self.send_error(status, reason)
        else:
            self.reset(code)

    # -- sending -------------------------------------------------------------------------------
    def push(self) -> None:
        """Send what the peer's windows allow; wake the app's send() once it has all gone."""
        conn = self.conn
        h2 = conn.h2
        out = self.out
        stream_id = self.id
        while out:
            piece = out[0]
            size = len(piece)
            window = h2.local_flow_control_window(stream_id)
            if size <= window and size <= h2.max_outbound_frame_size:
                h2.send_data(stream_id, piece, end_stream=self.out_end and len(out) == 1 and self.trailers is None)
                out.pop(0)  # type: ignore[union-attr]
                continue
            if window <= 0:
                conn.blocked.add(self)
                conn.send_stalled()
                conn.flush_soon()
                return
            size = min(window, h2.max_outbound_frame_size)
            view = memoryview(piece)
            h2.send_data(stream_id, view[:size])
            out[0] = view[size:]  # type: ignore[index]
        conn.blocked.discard(self)
        conn.flush_soon()
        if self.out_end:
            if self.trailers is not None and not self.ended:  # trailing HEADERS end the stream
                h2.send_headers(stream_id, self.trailers, end_stream=True)
            self.ended = True
            self.finish()
        self.release()

    def release(self) -> None:
        if self._waiters and not (self.conn.write_paused and not self.ended):
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters = ()

    def send_error(self, status: int, reason: str) -> None:
        """An answer of the server's own on this stream."""
        body = reason.encode()
        head, _ = self.conn.head.encode(status, ((b"content-type", b"text/plain; charset=utf-8"),))
        head.append((b"content-length", b"%d" % len(body)))
        self._send_head(head, False)
        if self.record is not None:
            self.record.bytes_sent = len(body)
        self.out, self.out_end = [body], True
        self.push()

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if not self.ended and self.conn.phase != CLOSED:
            self.ended = self.body_ended = True
            self.conn.h2.reset_stream(self.id, code)
            self.conn.flush_soon()
        self.out = ()
        self.conn.blocked.discard(self)
        self.finish()
        self.release()

    def finish(self) -> None:
        """The response is over (sent, reset or lost): count it and log it, once."""
        if self.finished:
            return
        self.finished = True
        self.deadline = 0.0
        conn = self.conn
        if self.record is not None:
            conn.state.request_done(self.record)
        if self.ended and not self.body_ended and conn.phase != CLOSED:
            # Answered before the whole request body came: ask the client to stop sending it.
            self.conn.h2.reset_stream(self.id, ErrorCodes.NO_ERROR)
            self.body_ended = True
        conn.stream_done(self)


class H2Connection(Connection):
    goaway_id: int | None = None  # the last stream id taken (retiring) and our GOAWAY names
    retiring = 0.0  # loop time the retirement began
    goaway_at = 0.0  # ... and when GOAWAY goes out even if streams are still in flight
    client_gone = False  # the client sent GOAWAY
    send_deadline = 0.0
    linger_deadline = 0.0
    _discarded = 0

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.phase = OPEN
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams waiting for window
        self.running = 0  # streams whose app has not finished
        self.served = 0
        self.idle_deadline = 0.0
        self._flush_pending = False
        self._priority_seen: Any = None
        self._reset_ids: set[int] | tuple[()] = ()
        options = state.h1
        self.options = options
        self.head = ResponseHead(state.defaults)
        limit = self.config.http2_max_concurrent_streams
        self.max_streams = limit
        self.budget = FloodBudget(max(100, 4 * limit), FLOOD_RATE, state.loop.time())
        h2 = self.h2 = H2State(H2_CONFIG)
        h2.incoming_buffer = BoundedFrameBuffer(options.limits.head)
        h2.encoder = StatelessEncoder()  # type: ignore[assignment]
        h2.decoder = FieldDecoder()
        h2.decoder.max_header_list_size = options.limits.head
        h2.local_settings = _LocalSettings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: limit,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: options.limits.head,
        })

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.take_over(transport, b"")  # type: ignore[arg-type]

    def take_over(self, transport: asyncio.Transport, data: bytes, peer: Any = None) -> None:
        """Start on ``transport``; ``data``: what was read already (the preface, at least);
        ``peer``: (client, server, extensions) from the HTTP/1.1 connection that read a PROXY
        header before the preface (its extension is kept: Gunicorn's proxy_protocol_info)."""
        self.attach(transport, WRITE_BATCH)
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        self.scheme = "https" if self.is_tls else "http"
        self.extensions = EXTENSIONS
        if peer is None:
            self.client = address(transport.get_extra_info("peername"))
            self.server = address(transport.get_extra_info("sockname"))
        else:
            self.client, self.server, h1_extensions = peer
            proxied = h1_extensions.get(PROXY_EXTENSION)
            if proxied is not None:
                self.extensions = {**EXTENSIONS, PROXY_EXTENSION: proxied}
        ssl_object = transport.get_extra_info("ssl_object") if self.is_tls else None
        if ssl_object is not None:  # the ASGI TLS extension, as on HTTP/1.1
            self.extensions = {**EXTENSIONS, "tls": tls_extension(ssl_object, self.config.ssl_certfile)}
        allow = self.options.forwarded_allow
        self.trust_proxy = self.options.proxy_headers and (
            allow is None or (self.client[0] if self.client else None) in allow
        )
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.idle_deadline = self.set_deadline(self.config.timeout_request_header)
        if data:
            if self.state.counters is not None:  # the HTTP/1.1 connection counted it already
                self.state.counters.received -= len(data)
            self.data_received(data)
        else:
            self.flush()
        # Accepted by a retiring server: the requests already read are served (as on HTTP/1.1)
        # and GOAWAY follows the answers to the client's first frames (the SETTINGS ACK).
        if not self.state.accepting_requests:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        counters = self.state.counters
        if counters is not None:
            counters.received += len(data)
        if self.phase == CLOSED or self.phase == DISCARD:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES and self.phase == DISCARD:
                self.drop()
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:  # h2 has queued its GOAWAY
            logger.debug("HTTP/2 connection error: %s", exc)
            self._end()
            return
        dispatch = _DISPATCH
        # Streams the client reset in this same read: no app is started for them, and h2 would
        # refuse frames we send on them (rapid reset sends HEADERS and RST_STREAM together).
        self._reset_ids = {e.stream_id for e in events if type(e) is StreamReset} if len(events) > 1 else ()
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.phase == CLOSED or self.phase == DISCARD:
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lose_streams()
        self.h2.detach()  # nothing is received any more

    def _lose_streams(self) -> None:
        """The client is gone: every stream's app learns it; what it sends is dropped."""
        self.blocked.clear()
        for stream in list(self.streams.values()):
            if stream.cycle is not None:
                stream.cycle.on_disconnect()
            stream.ended = stream.body_ended = True
            stream.out = ()
            stream.finish()
            stream.release()

    def pause_writing(self) -> None:
        # The client does not read what we send: stop reading what it sends (PINGs and
        # SETTINGS would queue their answers), and give it timeout_send to take some.
        self.write_paused = True
        self.pause_reading()
        self.send_stalled()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.blocked:
            self.send_deadline = 0.0
        self.resume_reading()
        for stream in list(self.streams.values()):
            stream.release()

    # -- events from h2 -----------------------------------------------------------------------
    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        self._priority_seen = event.priority_updated
        if self.goaway_id is not None and stream_id > self.goaway_id:
            return  # retiring, or after our GOAWAY: ignored; the client retries it elsewhere
        if self.running >= self.max_streams or stream_id in self._reset_ids:
            if stream_id not in self._reset_ids:  # else the client reset it in this same read
                self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._spend()
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.idle_deadline = 0.0
        try:
            scope, expect = request_scope(
                event.headers, self.options, self.server, self.client, self.scheme, self.trust_proxy,  # type: ignore[arg-type]
                self.extensions,
            )
        except HTTPError as err:
            if event.stream_ended:
                stream.body_ended = True
            stream.send_error(err.status, err.reason)  # refused before any app: not logged, as on HTTP/1.1
            return
        state = self.state
        state.active_requests += 1
        self.running += 1
        if scope["method"] == "HEAD":
            stream.head_method = True
        cycle = stream.cycle = stream.record = RequestCycle(stream, scope, expect)  # type: ignore[arg-type]
        if event.stream_ended:
            stream.body_ended = True
            cycle.more_body = False
        limit = self.config.limit_concurrency
        if limit is not None and state.active_requests > limit:
            state.shed(cycle)
            stream.send_error(503, "Service Unavailable")
            self._app_done(stream)
            return
        task = cycle.task = state.start_app(cycle.run_asgi(state.app))
        task.add_done_callback(lambda _: self._app_done(stream))

    def _on_data(self, event: DataReceived) -> None:
        data = event.data
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if not data and event.stream_ended is None:
            self._spend()
        cycle = stream.cycle if stream is not None else None
        if cycle is None or cycle.response_complete or cycle.disconnected or stream.ended:  # type: ignore[union-attr]
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)  # not wanted: window back now
            return
        if size > len(data):
            self.h2.acknowledge_received_data(size - len(data), event.stream_id)  # the padding
        if data:
            cycle.on_body(data)
            if stream.deadline:  # type: ignore[union-attr]
                rate = self.config.min_request_body_rate
                if rate:
                    stream.deadline += len(data) / rate  # type: ignore[union-attr]
                else:
                    stream.deadline = self.set_deadline(self.config.timeout_request_body)  # type: ignore[union-attr]

    def _on_end(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.body_ended = True
            stream.deadline = 0.0
            if stream.cycle is not None:
                stream.cycle.on_end()

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if event.remote_reset and not stream.ended:
            self._spend()  # a stream we started work for, given up (rapid reset: CVE-2023-44487)
        stream.ended = stream.body_ended = True
        stream.out = ()
        self.blocked.discard(stream)
        if stream.cycle is not None:
            stream.cycle.on_disconnect()
        stream.finish()
        stream.release()

    def _on_window(self, event: WindowUpdated) -> None:
        if not self.write_paused:
            self.send_deadline = 0.0  # progress; push() starts it again for what still waits
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.out:
                stream.push()
        else:
            for stream in list(self.blocked):
                stream.push()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        self._spend()
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for stream in list(self.blocked):
                stream.push()

    def _on_priority(self, event: PriorityUpdated) -> None:
        if event is not self._priority_seen:  # a PRIORITY frame of its own, not a HEADERS flag
            self._spend()

    def _on_overhead(self, event: Any) -> None:
        self._spend()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """The client goes away: what is in flight ends; the connection closes after it."""
        self.client_gone = True
        if not self.streams:
            self.close()

    def _spend(self) -> None:
        if not self.budget.spend(1.0, self.loop.time()):
            logger.warning("HTTP/2 client %s sent too many frames that served no request (flood or rapid reset); closing.", self.client)
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._end()

    # -- streams -------------------------------------------------------------------------------
    def _app_done(self, stream: H2Stream) -> None:
        self.running -= 1
        if stream.finished:
            self._forget(stream)

    def stream_done(self, stream: H2Stream) -> None:
        """A stream's response is over. Its app may still run; it is forgotten once it ends."""
        self.served += 1
        self.budget.earn(1.0)
        task = stream.cycle.task if stream.cycle is not None else None
        if task is None or task.done():
            self._forget(stream)

    def _forget(self, stream: H2Stream) -> None:
        """The stream's response and app are both done: nothing refers to it any more, and
        it lets go of its cycle (which points back at it) to be freed at once."""
        self.streams.pop(stream.id, None)
        stream.cycle = stream.record = None
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.streams or self.phase == CLOSED:
            return
        if self.client_gone:
            self.close()
        elif self.phase == GOING_AWAY:
            self._linger()
        elif self.retiring:
            self._go_away()
        else:
            self.idle_deadline = self.set_deadline(self.config.timeout_keep_alive)

    # -- bytes out -------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.phase == CLOSED or self.phase == DISCARD:
            return
        data = self.h2.data_to_send()
        if data and self.phase != LINGER:
            self.write(data)
        # In LINGER our GOAWAY was the last frame: what h2 queues now answers the client's
        # SETTINGS or PING sent before it read the GOAWAY, and a python-h2 client (httpx) takes
        # any frame after a GOAWAY for a protocol error ('RECV_SETTINGS in state CLOSED').

    def flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self.flush()

    # -- deadlines --------------------------------------------------------------------------------
    def set_deadline(self, delay: float) -> float:
        """A deadline ``delay`` from now, for the sweep to act on; returns it. ``delay``: a
        setting or constant server.shortest_deadline counts (the sweep relies on it)."""
        when = self.loop.time() + delay
        if not self.deadline or when < self.deadline:
            self.deadline = when
        return when

    def send_stalled(self) -> None:
        """We wait to send (windows closed, or the socket's buffer full): timeout_send runs."""
        if not self.send_deadline:
            self.send_deadline = self.set_deadline(self.config.timeout_send)

    def check_deadline(self, now: float) -> None:
        """The sweep: enforce whichever deadlines have passed, then note the next one."""
        if now < self.deadline:
            return
        if (self.phase == LINGER or self.phase == DISCARD) and now >= self.linger_deadline:
            Connection.close(self)  # the client did not close after our GOAWAY: close anyway
            return
        if self.send_deadline and now >= self.send_deadline:
            if self.blocked or self.write_paused:
                self.drop()  # the client has taken nothing of what we have to send
                self._lose_streams()
                return
            self.send_deadline = 0.0
        if self.idle_deadline and now >= self.idle_deadline:
            self.idle_deadline = 0.0  # header (a stalled preface) or keep-alive timeout
            if not self.streams:
                self._go_away()
        if self.retiring and self.phase == OPEN and now >= self.goaway_at:
            self._go_away()
        for stream in list(self.streams.values()):
            if stream.deadline and now >= stream.deadline:
                self._body_stalled(stream)
        if self.phase == CLOSED:
            return
        pending = [s.deadline for s in self.streams.values() if s.deadline]
        pending += [d for d in (self.idle_deadline, self.send_deadline) if d]
        if self.retiring and self.phase == OPEN:
            pending.append(self.goaway_at)
        if self.phase == LINGER or self.phase == DISCARD:
            pending.append(self.linger_deadline)
        self.deadline = min(pending) if pending else 0.0

    def _body_stalled(self, stream: H2Stream) -> None:
        stream.deadline = 0.0
        cycle = stream.cycle
        if cycle is None or stream.ended:
            return
        cycle.on_disconnect()
        stream.answer_or_cut(cycle, 408, "Request Timeout")
        self.flush()

    # -- ending ---------------------------------------------------------------------------------
    def shutdown(self, close_idle: bool = False) -> None:
        """Retire: the streams opened so far finish and later ones are ignored; GOAWAY naming
        the last one taken once they are done (or after the keep-alive timeout, for streams
        that take longer); the client opens the ignored ones elsewhere."""
        if self.phase != OPEN or self.retiring:
            return
        self.retiring = self.loop.time()
        self.goaway_id = self.h2.highest_inbound_stream_id
        if not self.streams:
            self._go_away()
        else:
            self.goaway_at = self.set_deadline(max(self.config.timeout_keep_alive, 1.0))

    def _go_away(self) -> None:
        """GOAWAY (NO_ERROR) naming the last stream we take. Written by us: h2's own
        close_connection would make it refuse the frames of the streams still in flight."""
        if self.phase != OPEN:
            return
        self.phase = GOING_AWAY
        if self.goaway_id is None:  # (retiring set it: the last stream taken)
            self.goaway_id = self.h2.highest_inbound_stream_id
        self.flush()
        self.write(GoAwayFrame(0, last_stream_id=self.goaway_id, error_code=0).serialize())
        if not self.streams:
            self._linger()

    def _linger(self) -> None:
        """GOAWAY is out and nothing is in flight: wait (bounded) for the client to close, so
        that our last frames are not destroyed by the reset closing with unread input sends."""
        self.phase = LINGER
        self.linger_deadline = self.set_deadline(LINGER_TIME)

    def eof_received(self) -> bool | None:
        if self.phase == DISCARD:
            Connection.close(self)
        return None  # the client closed: whatever was in flight is lost with it

    def close(self) -> None:
        if self.phase != CLOSED:
            self.flush()
            Connection.close(self)

    def _end(self) -> None:
        """A connection error (h2 queued its GOAWAY): send it and close; streams are lost. The
        close is a half-close where it can be: the client's further frames are read and dropped
        (bounded) until its FIN, or the reset that closing with unread input sends could destroy
        the GOAWAY before the client read why."""
        self.flush()
        self._lose_streams()
        transport = self.transport
        if self.write_paused or not transport.can_write_eof():
            Connection.close(self)
            return
        self.batch.flush()
        transport.write_eof()
        self.phase = DISCARD
        self.resume_reading()
        self.linger_deadline = self.set_deadline(LINGER_TIME)

    def abort(self) -> None:
        for stream in self.streams.values():
            if stream.cycle is not None and stream.cycle.task is not None:
                cancel_app(stream.cycle.task)
        self.drop()

    def in_flight(self) -> tuple[Any, ...]:
        return tuple(s.record for s in self.streams.values() if s.record is not None and not s.record.finished)

    def expire_requests(self, cutoff: float) -> None:
        """--timeout-request: a stream whose response is not complete in time gets 504, or a
        reset once its response began; the app, if it goes on, sees its client gone."""
        for stream in list(self.streams.values()):
            cycle = stream.cycle
            if cycle is None or stream.ended or cycle.response_complete or cycle.start_clock >= cutoff:
                continue
            self.state.request_timed_out(cycle)
            stream.answer_or_cut(cycle, 504, "Gateway Timeout")
            cycle.on_disconnect()
        self.flush()

    @property
    def task(self) -> asyncio.Task[None] | None:  # type: ignore[override]
        for stream in self.streams.values():
            if stream.cycle is not None and stream.cycle.task is not None and not stream.cycle.task.done():
                return stream.cycle.task
        return None


# What each h2 event is handed to: functions, not one connection's bound methods (a reference
# cycle per connection).
_DISPATCH: dict[type, Any] = {
    RequestReceived: H2Connection._on_request, DataReceived: H2Connection._on_data,
    StreamEnded: H2Connection._on_end, StreamReset: H2Connection._on_reset, WindowUpdated: H2Connection._on_window,
    PingReceived: H2Connection._on_overhead, RemoteSettingsChanged: H2Connection._on_settings,
    PriorityUpdated: H2Connection._on_priority, UnknownFrameReceived: H2Connection._on_overhead,
    ConnectionTerminated: H2Connection._on_goaway,
}
