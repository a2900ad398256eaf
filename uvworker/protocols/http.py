"""The HTTP/1.1 connection: bytes in, bytes out, deadlines and flow control.

Theory of operation. A connection is always in one of these phases:

    phase          deadline running           left by
    -------------  -------------------------  ----------------------------------------------
    WAIT_HEAD      timeout_request_header     a complete head → CYCLE (the app runs)
    KEEP_ALIVE     timeout_keep_alive         the first byte of the next request → WAIT_HEAD
    CYCLE          body deadline, if waiting  the response completes → KEEP_ALIVE, or close
                   for body the app asked for
    CLOSED         none                       (final)

The server's sweep enforces the deadline a few times a second (``check_deadline``).

A fresh connection starts in WAIT_HEAD, so a client that connects and never sends a request
is cut off by the header timeout, and one that trickles its head is cut off by the same
deadline (it is not reset by later bytes). While a cycle runs, further pipelined input is held
by the parser adapter and reading stops; when the response is complete the held input is
replayed, in order. Anything the parser refuses becomes a 4xx with ``Connection: close``,
after the responses to the requests before it.

Flow control, both ways: the cycle pauses reading when the app is not consuming the body, and
``send()`` waits for ``drain()`` while the transport's write buffer is over its high-water mark.

Retiring (graceful shutdown, max requests, reload): new requests on this connection still get
an answer, with ``Connection: close``; an idle keep-alive connection is left open until its
next request or its keep-alive timeout, because closing it races with a request the client may
be sending at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import Context
from typing import TYPE_CHECKING, Any

from uvworker.protocols.batch import WriteBatch
from uvworker.core.parsers import Headers, make_parser
from uvworker.core.request import build_scope, check_head
from uvworker.core.response import error_response
from uvworker.errors import HTTPError
from uvworker.protocols.cycle import RequestCycle

if TYPE_CHECKING:
    from uvworker.server import ServerState

logger = logging.getLogger("uvworker.error")

WAIT_HEAD, KEEP_ALIVE, CYCLE, CLOSED = range(4)
MAX_DISCARD = 4 * 1024 * 1024  # unread request body we drop to keep a connection, at most
WRITE_BATCH = 64 * 1024  # streamed response bytes that may wait for the end of a loop turn


class HTTPConnection(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config
        self.loop = state.loop
        self.phase = WAIT_HEAD
        self.cycle: RequestCycle | None = None
        self.keep_alive_allowed = True
        self.write_paused = False
        self.reading_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # One deadline per connection, checked by the server's sweep (``check_deadline``) a few
        # times a second: cheaper per request than arming and cancelling loop timers.
        self.deadline = 0.0
        self._discarded = 0
        self._proxy_buffer: bytes | None = b"" if self.config.proxy_protocol else None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.batch = WriteBatch(self.transport, self.loop, WRITE_BATCH)
        self.state.connections.add(self)
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        self.scheme = "https" if self.is_tls else "http"
        self._peer_trusted_for_proxy = self.config.proxy_headers and self._trusted(self.client)
        self.parser = make_parser(self.state.http_parser, self, self.state.limits)
        # A keep-alive timeout of 0 means no keep-alive: answer with Connection: close rather
        # than close the moment the response is out, which races the client's next request.
        if not self.state.accepting_requests or not self.config.timeout_keep_alive:
            self.keep_alive_allowed = False
        self._set_deadline(self.config.timeout_request_header)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.state.connections.discard(self)
        self.deadline = 0.0
        if self.cycle is not None:
            self.cycle.on_disconnect()
            self._finish(self.cycle)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == CLOSED:
            return
        if phase == KEEP_ALIVE:
            self.phase = WAIT_HEAD
        if self._proxy_buffer is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        try:
            self.parser.feed(data)
        except HTTPError as exc:
            self._reject(exc)
            return
        if phase == KEEP_ALIVE and self.phase == WAIT_HEAD:
            # A new request has begun but its head is not complete: the header timeout runs.
            # (Set only now: most heads arrive whole, and on_head clears the deadline anyway.)
            self._set_deadline(self.config.timeout_request_header)
        if self.parser.holding_input and not self.reading_paused:
            self.pause_reading()

    def pause_writing(self) -> None:
        # The client is not reading what we send: stop reading (and answering) what it sends,
        # and give it timeout_send to take some of it.
        self.write_paused = True
        self.pause_reading()
        if self.phase == CYCLE:
            self._set_deadline(self.config.timeout_send)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.phase == CYCLE:
            self.deadline = 0.0  # a body deadline, if any, is set again when the app asks for body
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self.phase == KEEP_ALIVE and self.cycle is None and self.parser.held:
            self._next_cycle()  # answer the pipelined requests we held back
        else:
            self.resume_reading()

    # -- parser events ----------------------------------------------------------------------
    def on_head(self, method: bytes, target: bytes, http_version: str, headers: Headers) -> None:
        state = self.state
        if http_version != "1.1" and http_version != "1.0":
            if http_version[:2] != "1.":
                raise HTTPError(505, "HTTP Version Not Supported")
            http_version = "1.1"  # RFC 9110 §2.5: a later 1.x minor version is served as 1.1
        keep_alive, expect, upgrade, proxied = check_head(http_version, headers)
        scope = build_scope(
            method, target, http_version, headers, server=self.server, client=self.client,
            scheme=self.scheme, root_path=self.config.root_path, state=state.lifespan_state,
        )
        self.deadline = 0.0
        self.phase = CYCLE
        if proxied and self._peer_trusted_for_proxy:
            state.apply_proxy_headers(scope, self.config.forwarded_allow)
        if upgrade == b"websocket" and method == b"GET" and http_version == "1.1" and self.config.ws != "none":
            from uvworker.protocols.websocket import upgrade_to_websocket

            if upgrade_to_websocket(self, scope):
                self.phase = CLOSED  # the transport now belongs to the WebSocket connection
                state.connections.discard(self)
                return
        cycle = self.cycle = RequestCycle(self, scope, keep_alive and self.keep_alive_allowed, expect)
        state.active_requests += 1
        limit = self.config.limit_concurrency
        if limit is not None and state.active_requests > limit:
            cycle.response_started = cycle.response_complete = True
            cycle.keep_alive = False
            cycle.status = 503
            self.send_error(503, "Service Unavailable", cycle)
            return
        cycle.task = self.loop.create_task(  # --reset-contextvars: a fresh, empty context
            cycle.run_asgi(state.app), context=Context() if self.config.reset_contextvars else None
        )

    def on_body(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is not None:
            if cycle.response_complete:
                self._discarded += len(data)
                if self._discarded > MAX_DISCARD:
                    self.close()
                return
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
            cycle.on_end()
            self.deadline = 0.0
            if cycle.response_complete:  # the body was being discarded after the response
                self.loop.call_soon(self._next_cycle)  # not from inside the parser

    # -- called by the cycle --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Write now, after whatever write_soon() batched."""
        if self.phase != CLOSED:
            self.batch.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        """Write now, by reference (one writev): for large pieces, which a join would copy."""
        if self.phase != CLOSED:
            self.batch.write(*parts)

    def write_soon(self, data: bytes) -> None:
        """A piece of a streamed response: the pieces sent in one loop turn go out in one write
        (at most WRITE_BATCH bytes wait, so send() still meets backpressure)."""
        if self.phase != CLOSED:
            self.batch.add(data)

    async def drain(self) -> None:
        if self.write_paused and self.phase != CLOSED:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def pause_reading(self) -> None:
        if not self.reading_paused and self.phase != CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()
            if self.phase == CYCLE:
                # Time the app spends not reading the body is not the client's fault: the body
                # deadline restarts when the app asks for more.
                self.deadline = 0.0

    def resume_reading(self) -> None:
        if self.reading_paused and not self.write_paused and not self.parser.holding_input and self.phase != CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    def wait_for_body(self) -> None:
        """The app is waiting for body bytes: make sure they flow, and bound how long."""
        self.resume_reading()
        if not self.deadline:
            self._set_deadline(self.config.timeout_request_body)

    def on_response_complete(self, cycle: RequestCycle) -> None:
        self._finish(cycle)
        if not cycle.keep_alive or self.phase == CLOSED:
            self.close()
        elif not cycle.more_body:
            self._next_cycle()
        else:
            # The app answered without reading the whole body: read and drop the rest (bounded
            # by the body deadline) so that the connection can be reused.
            self.resume_reading()
            self.wait_for_body()

    def abort_response(self, cycle: RequestCycle) -> None:
        """The response cannot be completed correctly: close rather than desynchronise."""
        self._finish(cycle)
        self.close()

    def send_error(self, status: int, reason: str, cycle: RequestCycle | None = None) -> None:
        self.write(error_response(status, reason, self.state.head_defaults(None)))
        if cycle is not None:
            cycle.bytes_sent = len(reason.encode())
            self._finish(cycle)
        self.close()

    # -- lifecycle ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Retire: answer what is in flight with Connection: close; no new keep-alive."""
        self.keep_alive_allowed = False
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = False

    def close(self) -> None:
        if self.phase != CLOSED:
            self.batch.flush()
            self.phase = CLOSED
            self.deadline = 0.0
            self.transport.close()

    def _drop(self) -> None:
        """Close now, discarding unsent bytes: the client is not reading them."""
        self.phase = CLOSED
        self.transport.abort()

    def abort(self) -> None:
        """Shutdown's last resort: cancel the app and drop the connection."""
        if self.cycle is not None and self.cycle.task is not None:
            self.cycle.task.cancel()
        self._drop()

    # -- internals ------------------------------------------------------------------------
    def _finish(self, cycle: RequestCycle) -> None:
        if not cycle.finished:
            cycle.finished = True
            self.state.request_done(cycle)

    def _next_cycle(self) -> None:
        self.cycle = None
        self.phase = KEEP_ALIVE
        self._discarded = 0
        self._set_deadline(self.config.timeout_keep_alive)
        if self.write_paused:
            return  # resume_writing() continues once the client reads its responses
        try:
            self.parser.next_cycle()
        except HTTPError as exc:
            self._reject(exc)
            return
        if self.reading_paused:
            self.resume_reading()  # unless more pipelined input is still held

    def _reject(self, exc: HTTPError) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.on_disconnect()  # the app sees its request end badly
            if cycle.task is not None:
                cycle.task.cancel()
            if cycle.response_started and not cycle.head:
                self.abort_response(cycle)
                return
            cycle.response_started = cycle.response_complete = True
            cycle.status = exc.status
            self.send_error(exc.status, exc.reason, cycle)
            return
        self.send_error(exc.status, exc.reason)

    def _set_deadline(self, delay: float) -> None:
        self.deadline = self.loop.time() + delay

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: enforce whichever timeout the phase has running."""
        if now < self.deadline:
            return
        self.deadline = 0.0
        cycle = self.cycle
        if self.phase != CYCLE or cycle is None:
            # Header or keep-alive timeout. A client that stopped reading our responses would
            # keep a graceful close waiting for the flush forever: abort those.
            self._drop() if self.write_paused else self.close()
        elif not cycle.response_started or cycle.head:
            cycle.on_disconnect()  # the body stalled before any answer: 408
            cycle.response_started = cycle.response_complete = True
            cycle.status = 408
            self.send_error(408, "Request Timeout", cycle)
        else:  # the body stalled after the answer began, or the client stopped reading it
            cycle.on_disconnect()
            self._drop() if self.write_paused else self.close()

    def _trusted(self, address: tuple[str, int] | None) -> bool:
        host = address[0] if address else None
        return host is None or host in self.config.forwarded_allow

    def _read_proxy_header(self, data: bytes) -> bytes:
        from uvworker.proxy import V1_PREFIX, V2_SIGNATURE, ProxyProtocolError, parse_proxy_protocol

        buffer = self._proxy_buffer + data  # type: ignore[operator]
        if not (V1_PREFIX.startswith(buffer[:6]) or V2_SIGNATURE.startswith(buffer[:12])):
            self._proxy_buffer = None
            return buffer
        host = self.client[0] if self.client else None
        try:
            if host is not None and host not in self.state.proxy_allow:
                raise ProxyProtocolError("PROXY header from a peer not in proxy_allow_ips")
            info = parse_proxy_protocol(buffer)
        except ProxyProtocolError as exc:
            self.send_error(400, f"Invalid PROXY protocol header: {exc}")
            return b""
        if info is None:
            self._proxy_buffer = buffer
            return b""
        self._proxy_buffer = None
        if info.client is not None:
            self.client = info.client
            self.server = info.server or self.server
            self._peer_trusted_for_proxy = self.config.proxy_headers and self._trusted(self.client)
        return buffer[info.consumed :]



def _address(address: Any) -> Any:
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    if isinstance(address, str) and address:
        return (address, None)
    return None
