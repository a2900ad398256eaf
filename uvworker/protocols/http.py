"""The HTTP/1.1 transport: moves bytes between the socket and the sans-I/O core, runs the
deadlines and the flow control, and carries each request's ASGI cycle (it is the cycle's
``Stream``).

Theory of operation. A connection is always in one of these phases:

    phase          deadline running           left by
    -------------  -------------------------  ----------------------------------------------
    WAIT_HEAD      timeout_request_header     a complete head → CYCLE (the app runs), or
                                              UPGRADE (a WebSocket handshake)
    KEEP_ALIVE     timeout_keep_alive, once   the first byte of the next request → WAIT_HEAD
                   the response is out (till
                   then timeout_send; counted
                   from the sweep's last tick,
                   IDLE_SLACK past it)
    CYCLE          body deadline, if waiting  the response completes → KEEP_ALIVE, or close
                   for body the app asked for;
                   timeout_send while the
                   client does not read
    UPGRADE        none (the app decides)     websocket.accept → the transport belongs to a
                                              WebSocketConnection; a refusal → close
    LINGER         LINGER_TIME                our FIN is sent; input is read and dropped
                                              until the client's FIN → CLOSED (skipped when
                                              the client said its request was its last and
                                              all it sent has been read: closed at once)
    CLOSED         none                       (final)

The server's sweep enforces the deadline a few times a second (``check_deadline``), and with
--timeout-request it ends a CYCLE whose response is not complete in time (``expire_requests``):
504 if nothing is out yet, else the close (a partial response must not pass for a whole one).

The client's FIN in CYCLE, after its whole request, is a half-close: the response still goes
out (the app's receive() says http.disconnect), then the connection closes. Anywhere else the
FIN closes the connection (LINGER: the graceful close is complete).

A fresh connection starts in WAIT_HEAD, so a client that connects and never sends a request
is cut off by the header timeout, and one that trickles its head is cut off by the same
deadline (it is not reset by later bytes). While a cycle runs, further pipelined input is held
by the core and reading stops; when the response is complete the held input is delivered, in
order. Anything the core refuses becomes a 4xx with ``Connection: close``, after the responses
to the requests before it.

Flow control, both ways: the cycle pauses reading when the app is not consuming the body, and
``send()`` waits for ``drain()`` while the transport's write buffer is over its high-water mark.

Retiring (max requests, reload: the server goes on in other workers): new requests on this
connection still get an answer, with ``Connection: close``; an idle keep-alive connection is
left open until its next request or its keep-alive timeout, because closing it races with a
request the client may be sending at that moment. When the whole server stops
(``shutdown(close_idle=True)``) nobody else could answer that request: idle connections are
closed at once, gracefully (our side first, then the client's FIN or a short linger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from sys import getrefcount
from typing import TYPE_CHECKING, Any

from uvworker.core.h1 import CLOSE, DISCARD, NEXT, BodyLengthError, H1Core
from uvworker.core.request import accepts_trailers
from uvworker.core.tls import tls_extension
from uvworker.errors import HTTPError
from uvworker.protocols.connection import (
    CLOSED, LINGER_TIME, Connection, ServerState, address, cancel_app, input_waiting,
)
from uvworker.protocols.cycle import RequestCycle
from uvworker.protocols.eager import FREE, Eager, run as run_app

if TYPE_CHECKING:
    from uvworker.protocols.websocket import WebSocketConnection

logger = logging.getLogger("uvworker.error")

WAIT_HEAD, KEEP_ALIVE, CYCLE, UPGRADE, LINGER = range(1, 6)
_new = object.__new__
WRITE_BATCH = 64 * 1024  # streamed response bytes that may wait for the end of a loop turn
EARLY_DATA_LIMIT = 64 * 1024  # bytes a client may send behind a WebSocket handshake, unparsed
LINGER_BYTES = 1024 * 1024  # how much input a linger (LINGER_TIME) reads and drops at most
SENDFILE_CHUNK = 1024 * 1024  # file bytes one os.sendfile call may send before others get a turn
FILE_CHUNK = 256 * 1024  # file bytes read and written at a time over TLS
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Above this many open connections a request read in data_received runs its app's first step
# at once (protocols.eager), for the CPU's caches. Below it a loop turn's requests fit in
# them anyway and the plain task is cheaper. Per request (instructions.py --cache: hello
# world, uvloop, a 1 MiB L2), the eager start costs ~3.6k instructions more and saves these
# L2 misses (plain -> eager): 192 connections 12.5 -> 0.9, 256: 28.9 -> 2.8, 384: 76.9 ->
# 8.1, 512: 96 -> 24, 1024: ~100 -> 39. At ~50 cycles a miss (an L3 hit) 3.6k instructions
# (~1.5k cycles) cost what 26 misses do: about even at 256, the misses' side from there on.
EAGER_ABOVE = 256
# CALLABLE_ATTRIBUTES: on the hot path, a callable kept in an instance attribute is loaded into
# a local and then called: ``obj.attr(...)`` compiles to a method load, which 3.11 cannot
# specialize for an instance's own attribute and looks up the generic way (~200 instructions).


class HTTPConnection(Connection):
    # Slots, as Connection's (whose come first in the block): one block per connection, with no
    # compact values array apart from it, and the attributes a request reads most up front:
    # fewer cache lines for a request to touch, each cold by its turn at 1024 connections.
    __slots__ = (
        "core", "parser", "starting", "cycle", "fresh", "send_start", "upgrade", "_lingered", "_early", "_file_waiter",
        "is_tls", "h2c", "_preface", "wsgi_environ", "eager", "holding",
    )

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.phase = WAIT_HEAD
        self.cycle: RequestCycle | None = None
        self.upgrade: WebSocketConnection | None = None  # a WebSocket handshake in progress
        self.fresh = True  # nothing received yet: idle, for a stopping server
        self._lingered = 0  # bytes dropped after our FIN
        self._early: list[bytes] | tuple[()] = ()  # bytes after a WebSocket handshake, until accept
        self._file_waiter: asyncio.Future[bool] | None = None  # pathsend waits to write
        self.is_tls = False
        self.h2c = False  # a cleartext connection that may open with the HTTP/2 preface
        self._preface = b""  # the part of the HTTP/2 preface read so far
        self.core: H1Core = None  # type: ignore[assignment]  # connection_made
        self.parser: Any = None  # the core's parser adapter
        self.send_start: Any = None  # the core's start (the cycle's stream.send_start)
        self.wsgi_environ: Any = None  # the WSGI adapter's environ part shared by the requests
        # A request read whose app is to start eagerly (EAGER_ABOVE) once the parser has
        # returned: by data_received; by _next_cycle as a plain task (from inside a task).
        self.starting: RequestCycle | None = None
        self.eager: Eager | None = None  # kept for the next eager start (protocols.eager.run)
        self.holding = False  # in an eager start: a whole response waits for a burst (batch.Outbox)

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport, WRITE_BATCH)  # type: ignore[arg-type]
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        state = self.state
        if state.config.serve_h2:
            if self.is_tls:  # ALPN chose the protocol during the handshake
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                    self._switch_to_h2(b"")
                    return
            else:  # cleartext: the first bytes tell (HTTP/2 prior knowledge; a PROXY header: HTTP/1.1)
                self.h2c = True
        core = self.core = H1Core(
            state.h1, self, state.defaults, address(transport.get_extra_info("peername")),
            address(transport.get_extra_info("sockname")), "https" if self.is_tls else "http",
        )
        self.parser = core.parser
        self.send_start = core.start  # the cycle's stream.send_start(status, headers), direct
        if self.is_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                tls = tls_extension(ssl_object, self.config.ssl_certfile)
                core.extensions = {**core.extensions, "tls": tls}
                core.extensions_10 = {**core.extensions_10, "tls": tls}
        if not state.accepting_requests:
            core.keep_alive_allowed = False
        self._set_deadline(self.config.timeout_request_header)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._file_waiter is not None and not self._file_waiter.done():
            self._file_waiter.set_result(False)
        cycle = self.cycle
        if cycle is not None:
            cycle.on_disconnect()
            self.state.request_done(cycle)
            self.cycle = None  # the cycle points back here (and its app may hold it longer)
        spare = self.state.spare
        if spare is not None and spare.stream is self:
            self.state.spare = None  # nor is this connection kept for the next request's sake
        if self.upgrade is not None:
            self.upgrade.handshake_lost()
            self.state.request_done(self.upgrade)
        # Nothing comes after this: break the cycles between the connection's objects, so that
        # it is freed now, not by the collector (row close-64: 30 objects of cyclic garbage).
        self.core.detach()

    def data_received(self, data: bytes) -> None:
        if self.state.counters is not None:  # (no name stored for the test alone)
            self.state.counters.received += len(data)
        phase = self.phase
        if phase == KEEP_ALIVE:
            self.phase = WAIT_HEAD
        elif phase == UPGRADE:
            self._hold_early(data)
            return
        elif phase == LINGER:
            self._linger(data)
            return
        elif phase == CLOSED:
            return
        if self.fresh:
            self.fresh = False
            if self.h2c or self.core.proxy_buffer is not None:
                data = self._first_bytes(data)
                if not data:
                    return
        try:
            # The parser's own feed (the core's says the same once no PROXY header is due):
            # the adapter is touched anyway, a bound method kept per connection would be a
            # cache line more for each request at 1024 connections.
            self.parser.feed(data)
        except HTTPError as exc:
            self.on_refused(exc)
            return
        if self.phase == WAIT_HEAD and phase == KEEP_ALIVE:  # (false at once for a whole head)
            # A new request has begun but its head is not complete: the header timeout runs.
            # (Set only now: most heads arrive whole, and on_request clears the deadline anyway.)
            self._set_deadline(self.config.timeout_request_header)
        if self.parser.holding_input and not self.reading_paused:
            self.pause_reading()
        cycle = self.starting
        if cycle is not None:
            self.starting = None
            self.holding = True
            try:
                run_app(self, cycle)  # its first step now, while the request is in cache
            finally:
                self.holding = False

    def eof_received(self) -> bool | None:
        if self.phase == LINGER:
            Connection.close(self)  # the client's FIN: the graceful close is complete
        elif self.phase == CYCLE:
            return self._half_closed()
        return None

    def _half_closed(self) -> bool:
        """The client's FIN while its request is served: a client that sent its whole request
        may half-close and still read the answer (RFC 9112 §9.6; Gunicorn and Hypercorn answer
        it, uvicorn drops it). The app's receive() says http.disconnect from now on, as when the
        client has gone (which its FIN may mean too), but what it sends still goes out, and the
        connection closes after the response. Returns whether the transport stays open."""
        cycle, core = self.cycle, self.core
        if cycle is None or cycle.response_complete or not core.body_complete or not self.transport.can_write_eof():
            return False  # (TLS cannot half-close; a body cut short cannot be answered)
        core.keep_alive = False
        core.last_request = True  # nothing more comes: closed at once after the response
        if core.after == NEXT:
            core.after = CLOSE  # a head already out said keep-alive
        cycle.on_half_close()
        return True

    def pause_writing(self) -> None:
        # The client is not reading what we send: stop reading (and answering) what it sends,
        # and give it timeout_send to take some of it.
        self.write_paused = True
        self.pause_reading()
        if self.phase == CYCLE or self.phase == KEEP_ALIVE:  # a response still going out
            self._set_deadline(self.config.timeout_send)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.phase == CYCLE:
            self.deadline = 0.0  # a body deadline, if any, is set again when the app asks for body
        elif self.phase == KEEP_ALIVE:
            self._set_deadline(self.config.timeout_keep_alive)  # idle from now: the response is out
        self._release_writers()
        if self.phase == KEEP_ALIVE and self.cycle is None and self.parser.held:
            self._next_cycle()  # answer the pipelined requests we held back
        else:
            self.resume_reading()

    # -- events from the core ---------------------------------------------------------------
    def on_request(self, scope: dict[str, Any]) -> None:
        state = self.state
        self.deadline = 0.0
        self.phase = CYCLE
        core = self.core
        # RequestCycle(...) without the class call, whose generic path (type.__call__, then
        # __init__ looked up and called with a tuple) costs ~180 instructions more.
        if len(state.connections) > EAGER_ABOVE:
            eager = True  # (a bool stored from the test itself is a generic comparison: ~100 more)
            # The request before (this connection's or another's) has most often finished in
            # its eager start: its cycle serves this one once nothing else holds it (no app,
            # task, hook, nor connection: getrefcount counts state.spare and this frame only),
            # still in the CPU's caches (~1k instructions less than one freed and one made).
            # A cycle kept per connection would be a cold object by its turn (L2 misses);
            # below EAGER_ABOVE a turn's apps run after all its requests are read, so the one
            # spare would seldom be free.
            cycle = state.spare
            if getrefcount(cycle) != FREE:
                cycle = state.spare = _new(RequestCycle)
        else:
            eager = False
            cycle = _new(RequestCycle)
        self.cycle = cycle
        # Every attribute set (again). A bodiless request read whole has ended already (no on_end follows).
        cycle.__init__(self, scope, core.expect_continue, not core.body_complete)
        state.active_requests += 1
        if state.gated and self._gate(cycle):  # (one test for both, on the hot path)
            return
        if eager:
            self.starting = cycle  # started once the parser has returned (data_received)
        else:
            cycle.task = state.start_app(cycle.run_asgi(state.app))

    def _gate(self, cycle: RequestCycle) -> bool:
        """With --limit-concurrency or an app that serves cycles itself (``state.gated``):
        whether ``cycle`` is answered 503 (over the limit) or given to that app, and so is not
        started as an ASGI task."""
        state = self.state
        limit = self.config.limit_concurrency
        if limit is not None and state.active_requests > limit:
            state.shed(cycle)
            self.send_error(503, "Service Unavailable", cycle)
            return True
        if state.direct is not None:
            state.direct(cycle)
            return True
        return False

    def on_upgrade(self, scope: dict[str, Any]) -> None:
        from uvworker.protocols.websocket import new_session

        session = new_session(self, scope)
        if session is None:  # no WebSocket support installed: plain HTTP
            self.on_request(scope)
            return
        self.deadline = 0.0
        self.phase = UPGRADE
        self.state.active_requests += 1
        self.upgrade = session
        session.start()

    def on_body(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is not None:
            cycle.on_body(data)
            if self.deadline:
                rate = self.config.min_request_body_rate
                if rate:  # slow but steady bodies earn time
                    self.deadline += len(data) / rate
                else:  # no rate: the deadline only bounds a stall
                    self._set_deadline(self.config.timeout_request_body)

    def on_end(self) -> None:
        cycle = self.cycle
        if cycle is not None:
            if cycle.waiter is None:  # cycle.on_end(), inlined: most GETs end before the app asks for body
                cycle.more_body = False
            else:
                cycle.on_end()
            if self.phase == CYCLE:  # the body's deadline; not a linger's (a 503 closed at once)
                self.deadline = 0.0

    def on_discarded(self, reusable: bool) -> None:
        """The body the app left unread after its response has been dropped (or was too big)."""
        self.deadline = 0.0
        if reusable:
            self.loop.call_soon(self._after_discard)  # not from inside the parser
        else:
            self.close()

    def on_refused(self, error: HTTPError) -> None:
        self.starting = None  # a request refused before its app started: it never does
        # A warning, as in uvicorn and Gunicorn (whose statsd logger counts it: gunicorn.log.warning).
        client = self.core.client
        logger.warning("Invalid request from %s: %d %s", client[0] if client else "?", error.status, error.reason)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.on_disconnect()  # the app sees its request end badly
            if cycle.task is not None:
                cancel_app(cycle.task)
            if cycle.response_started and not self.core.head:
                self.state.request_done(cycle)
                self.close()  # part of the response is out: cut it rather than desynchronise
                return
            cycle.response_started = cycle.response_complete = True
            cycle.status = error.status
            self.send_error(error.status, error.reason, cycle)
            return
        self.send_error(error.status, error.reason)

    # -- the cycle's stream ---------------------------------------------------------------------
    def send_continue(self) -> None:
        data = self.core.continue_()
        if data:
            self.write(data)

    def want_body(self) -> None:
        """The app is waiting for body bytes: make sure they flow, and bound how long."""
        self.resume_reading()
        if not self.deadline:
            self._set_deadline(self.config.timeout_request_body)

    def pause_body(self) -> None:
        if not self.reading_paused and self.phase != CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()
            # Time the app spends not reading the body is not the client's fault: the body
            # deadline restarts when the app asks for more.
            self.deadline = 0.0

    def body_consumed(self, size: int) -> None:
        if self.reading_paused:
            self.resume_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.write_paused and not self.parser.holding_input and self.phase != CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    def send_body(self, cycle: RequestCycle, body: bytes, more: bool) -> None:
        core = self.core
        try:
            data = core.body(body, more)
        except BodyLengthError as err:
            cycle.response_complete = True
            if err.committed:
                self.writelines(err.data) if type(err.data) is tuple else self.write(err.data)
                self.state.request_done(cycle)
                self.close()
            else:
                cycle.status = 500
                self.send_error(500, "Internal Server Error", cycle)
            raise
        if type(data) is bytes:
            if data:
                if more:
                    self.write_soon(data)
                elif self.phase != CLOSED:  # Connection.write, inlined: once a response
                    if self.batching:  # after what is batched, or counted
                        batch = self.batch
                        batch.write(data)
                        self.batching = batch.counted  # (nothing is batched now)
                    elif self.holding:  # an eager start's: written in a burst with others'
                        self.state.outbox.hold(self, data)
                    else:  # straight through, as batch.write would, the batch unread (see batching)
                        self.transport.write(data)
        else:
            self.writelines(data)  # type: ignore[arg-type]
        if not core.no_body:
            cycle.bytes_sent += len(body)
        if not more:
            self.state.request_done(cycle)
            after = core.after
            if after == NEXT:
                self._next_cycle()
            elif after == DISCARD and self.phase != CLOSED:
                # The app answered without reading the whole body: read and drop the rest
                # (bounded in size, and by the body deadline) so the connection can be reused.
                core.discard_body()
                self.want_body()
            elif core.client_finished:
                Connection.close(self)  # no linger: nothing more comes for a reset to answer
            else:
                self.close()

    def send_early_hint(self, links: list[bytes]) -> None:
        data = self.core.early_hint(links)
        if data:
            self.write(data)

    def send_trailers(self, cycle: RequestCycle, headers: Any) -> None:
        try:
            data = self.core.trailers(headers, accepts_trailers(cycle.scope["headers"]))
        except RuntimeError:  # a field that cannot be sent: the response is cut
            self.state.request_done(cycle)
            self.close()
            raise
        if data:
            self.write_soon(data)
        self.send_body(cycle, b"", False)  # the end, as after any body

    # -- pathsend --------------------------------------------------------------------------------
    async def send_file(self, cycle: RequestCycle, fd: int, size: int, more: bool) -> None:
        """The file as the body: os.sendfile from the page cache to the socket on plaintext
        (no copy through Python, memory flat whatever the size), FILE_CHUNK reads written
        through the transport over TLS. Disk reads block the loop, as the kernel's sendfile
        does (page-cache hits are the common case)."""
        core = self.core
        try:
            prefix, suffix = core.file(size, more)
        except BodyLengthError:
            cycle.response_complete = True
            cycle.status = 500
            self.send_error(500, "Internal Server Error", cycle)
            raise
        self.write(prefix)
        if size and not core.no_body:
            sock = None if self.is_tls else self.transport.get_extra_info("socket")
            if sock is not None:
                sent = await self._sendfile(cycle, sock.fileno(), fd, size)
            else:
                sent = await self._write_file(cycle, fd, size)
            if sent < size or self.phase != CYCLE:  # the client has gone or stalled, or the file shrank
                self.state.request_done(cycle)
                self.close()
                return
            if suffix:
                self.write_soon(suffix)
        if not more:
            self.send_body(cycle, b"", False)  # the end, as after any body

    async def _sendfile(self, cycle: RequestCycle, sock_fd: int, fd: int, size: int) -> int:
        """os.sendfile on a duplicate of the socket's descriptor: the loop polls the duplicate
        for writability (the transport owns the original), and the transport's own buffer is
        empty first, so the head goes before the file. Returns the bytes sent."""
        out = os.dup(sock_fd)
        sent = 0
        try:
            while self.transport.get_write_buffer_size():
                if not await self._writable(out):
                    return 0
            while sent < size and self.phase == CYCLE:
                try:
                    count = os.sendfile(out, fd, sent, min(size - sent, SENDFILE_CHUNK))
                except BlockingIOError:
                    count = -1
                except OSError:  # reset by the client
                    return sent
                if count == 0:  # the file is shorter than it was
                    return sent
                if count > 0:
                    sent += count
                    cycle.bytes_sent += count  # as it goes: a client that leaves is logged now
                if sent < size and not await self._writable(out):
                    return sent
        finally:
            os.close(out)
        return sent

    async def _writable(self, out: int) -> bool:
        """Wait until the socket takes more (or timeout_send runs out: the client is dropped)."""
        if self.phase != CYCLE:
            return False
        waiter = self._file_waiter = self.loop.create_future()
        self.loop.add_writer(out, _wake, waiter)
        self._set_deadline(self.config.timeout_send)
        try:
            return await waiter
        finally:
            self.loop.remove_writer(out)
            self._file_waiter = None
            if self.phase == CYCLE:
                self.deadline = 0.0

    async def _write_file(self, cycle: RequestCycle, fd: int, size: int) -> int:
        """The file in FILE_CHUNK pieces through the transport (TLS): memory is bounded by a
        piece and the transport's high-water mark, as send() is. Returns the bytes written."""
        sent = 0
        while sent < size and self.phase == CYCLE:
            data = os.pread(fd, min(FILE_CHUNK, size - sent), sent)
            if not data:  # the file is shorter than it was
                break
            self.write(data)
            sent += len(data)
            cycle.bytes_sent += len(data)
            if self.write_paused:
                await self.drain()
            else:
                await asyncio.sleep(0)  # others get a turn between pieces
        return sent

    def fail(self, cycle: RequestCycle) -> None:
        if self.cycle is not cycle or self.phase == CLOSED:
            return
        if cycle.disconnected:  # an app that gave up on a client that half-closed (and may have gone)
            self.state.request_done(cycle)
            Connection.close(self)
        elif not cycle.response_started or self.core.head:  # nothing is out yet: answer 500
            cycle.response_started = True
            cycle.status = 500
            self.send_error(500, "Internal Server Error", cycle)
        else:
            self.state.request_done(cycle)
            self.close()

    def send_error(self, status: int, reason: str, record: Any = None, extra: bytes = b"") -> None:
        """An answer of the server's own instead of the app's; the connection closes after it."""
        self.write(self.core.error(status, reason, extra))
        if record is not None:
            record.bytes_sent = len(reason.encode())
            self.state.request_done(record)
        self.close()

    # -- HTTP/2 ----------------------------------------------------------------------------------
    def _first_bytes(self, data: bytes) -> bytes:
        """A connection's first bytes, when a PROXY header is due or HTTP/2 may begin: what
        follows the PROXY header (HAProxy, curl --haproxy-protocol; the HTTP/2 preface may
        follow it), for HTTP/1.1; b"" when there is nothing for HTTP/1.1 (yet). The
        connection stays fresh (so data_received comes here again) while the header is
        incomplete or nothing followed it."""
        core = self.core
        if core.proxy_buffer is not None:
            data = core.strip_proxy_header(data)
            if not data:
                self.fresh = core.proxy_buffer is not None or self.phase == WAIT_HEAD  # else refused
                return b""
        return self._sniff_h2c(data) if self.h2c else data

    def _sniff_h2c(self, data: bytes) -> bytes:
        """A cleartext connection's first bytes after any PROXY header: the HTTP/2 connection
        preface hands the connection to HTTP/2 (returns b""); anything else is returned, for
        HTTP/1.1."""
        core = self.core
        data = self._preface + data
        if data[:1] != b"P":
            return data
        if data[: len(H2_PREFACE)] == H2_PREFACE:
            peer = (core.client, core.server, core.extensions)  # as the PROXY header said, if any
            core.detach()  # nothing comes here any more: freed now, as after connection_lost
            self._switch_to_h2(data, peer)
            return b""
        if H2_PREFACE.startswith(data):  # a part of it: wait for the rest
            self._preface = data
            self.fresh = True
            return b""
        return data

    def _switch_to_h2(self, data: bytes, peer: Any = None) -> None:
        """The transport now belongs to an HTTP/2 connection; ``data``: what it has read;
        ``peer``: the client and server addresses and the extensions a PROXY header gave."""
        from uvworker.protocols.h2 import H2Connection

        self.phase = CLOSED
        self.deadline = 0.0
        self.state.connections.discard(self)
        h2 = H2Connection(self.state)
        self.transport.set_protocol(h2)
        h2.take_over(self.transport, data, peer)

    # -- the WebSocket handshake -----------------------------------------------------------------
    def _hold_early(self, data: bytes) -> None:
        """Bytes behind a handshake (the client's first frames): kept, bounded, until accept."""
        if self.upgrade is not None:
            if self._early:
                self._early.append(data)  # type: ignore[union-attr]
            else:
                self._early = [data]  # a list only for a connection that gets such bytes
            if sum(map(len, self._early)) > EARLY_DATA_LIMIT:
                self.pause_reading()

    def start_denial(self, record: Any) -> RequestCycle:
        """The app refuses the handshake with an HTTP response of its own: a cycle for it."""
        cycle = self.cycle = RequestCycle(self, record.scope)
        self.upgrade = None  # the phase stays UPGRADE: later input is dropped, the close follows
        self.core.keep_alive = self.core.keep_alive_allowed = False
        cycle.start_clock, cycle.task = record.start_clock, record.task
        return cycle

    def refuse_handshake(self, record: Any, status: int, reason: str, extra: bytes = b"") -> None:
        """The handshake ends with an answer of the server's own (400, 403, 426, 500, 503)."""
        if self.upgrade is record:
            self.upgrade = None
            record.status = status
            self.send_error(status, reason, record, extra)

    def hand_over(self, ws: WebSocketConnection) -> bytes:
        """websocket.accept: the transport now belongs to ``ws``; returns the bytes read past
        the handshake (its first frames)."""
        early = self.core.trailing_data + b"".join(self._early)
        self._early = ()
        self.upgrade = None
        self.phase = CLOSED
        self.state.connections.discard(self)
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.core.detach()  # nothing comes here any more: freed now, as after connection_lost
        return early

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def task(self) -> asyncio.Task[None] | None:  # type: ignore[override]
        if self.upgrade is not None:
            return self.upgrade.task
        return self.cycle.task if self.cycle is not None else None

    def shutdown(self, close_idle: bool = False) -> None:
        """Retire: answer what is in flight with Connection: close; no new keep-alive."""
        self.core.keep_alive_allowed = False
        if self.upgrade is not None:
            self.upgrade.retire()
        elif close_idle and (self.phase == KEEP_ALIVE or (self.phase == WAIT_HEAD and self.fresh)):
            if self.parser.holding_input or input_waiting(self.transport):
                return  # a request is here, read or not yet: it gets its answer first
            self.close()

    def close(self) -> None:
        """Close after what is written, gracefully (RFC 9112 §9.6): our FIN first, then read
        and drop what the client still sends until its FIN, for at most LINGER_TIME and
        LINGER_BYTES. Closing a socket with unread input makes the kernel send a reset, which
        can destroy our last response (a 400, a 431) before the client has read it. (After a
        response to a client whose request was its last and is read whole, send_body closes
        at once: no input is due, and the linger's half-close, read and wake-up are saved.)"""
        if self.phase == CLOSED or self.phase == LINGER:
            return
        transport = self.transport
        if self.write_paused or not transport.can_write_eof():  # stuck, or TLS: no half-close
            super().close()
            return
        self.release()
        self.batch.flush()
        self.phase = LINGER
        self._lingered = 0
        transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self._set_deadline(LINGER_TIME)

    def _linger(self, data: bytes) -> None:
        self._lingered += len(data)
        if self._lingered > LINGER_BYTES:
            self.drop()

    def _reset(self) -> None:
        """Close with a reset (RST), which no client takes for the end of a response."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.drop()

    def _after_discard(self) -> None:
        if self.phase == CYCLE:  # not closed or lost meanwhile
            self._next_cycle()

    def _next_cycle(self) -> None:
        self.cycle = None
        self.phase = KEEP_ALIVE
        self.deadline = self.state.keep_alive_deadline  # the keep-alive timeout, from the sweep's last tick
        if self.state.closing_idle and not self.parser.holding_input:
            self.close()  # the whole server is stopping: nobody would answer a next request
            return
        if self.write_paused:
            # Not idle while the response is still going out (a slow client, a big body): the
            # send timeout runs, and resume_writing() starts the keep-alive timeout.
            self._set_deadline(self.config.timeout_send)
            return  # resume_writing() continues once the client reads its responses
        try:
            self.parser.next_cycle()
        except HTTPError as exc:
            self.on_refused(exc)
            return
        cycle = self.starting
        if cycle is not None:  # a pipelined request, read from the parser's held input
            self.starting = None
            cycle.task = self.state.start_app(cycle.run_asgi(self.state.app))
        if self.reading_paused:
            self.resume_reading()  # unless more pipelined input is still held

    def _set_deadline(self, delay: float) -> None:
        # delay: a setting or constant server.shortest_deadline counts (the sweep relies on it)
        self.deadline = self.loop.time() + delay

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: enforce whichever timeout the phase has running."""
        if now < self.deadline:
            return
        self.deadline = 0.0
        cycle = self.cycle
        if self.phase == LINGER:
            Connection.close(self)  # the client never sent its FIN: close anyway
        elif self.phase != CYCLE or cycle is None:
            # Header, keep-alive or linger timeout. A client that stopped reading our responses
            # would keep a graceful close waiting for the flush forever: abort those.
            self.drop() if self.write_paused else self.close()
        elif not cycle.response_started or self.core.head:
            cycle.on_disconnect()  # the body stalled before any answer: 408
            cycle.response_started = cycle.response_complete = True
            cycle.status = 408
            self.send_error(408, "Request Timeout", cycle)
        else:  # the body stalled after the answer began, or the client stopped reading it
            cycle.on_disconnect()
            self.drop() if self.write_paused or self._file_waiter is not None else self.close()


    def in_flight(self) -> tuple[Any, ...]:
        return tuple(record for record in (self.cycle, self.upgrade) if record is not None and not record.finished)

    def expire_requests(self, cutoff: float) -> None:
        cycle = self.cycle
        if cycle is None or self.phase != CYCLE or cycle.response_complete or cycle.start_clock >= cutoff:
            return
        self.state.request_timed_out(cycle)  # logged before the answer's access log line
        if not cycle.response_started or self.core.head:
            cycle.response_started = cycle.response_complete = True
            cycle.status = 504
            self.send_error(504, "Gateway Timeout", cycle)
        else:
            cycle.response_complete = True
            self.state.request_done(cycle)
            if self.core.remaining is None and not self.core.chunked:
                self._reset()  # close-delimited (HTTP/1.0): a FIN would read as the body's end
            else:
                self.drop() if self.write_paused else self.close()
        cycle.on_disconnect()  # the app, if it goes on, sees its client gone


def _wake(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)
