"""What every connection of a server shares, and the transport work every protocol does alike.

``ServerState`` is made by the server and handed to each connection: the settings the
transports read (the sans-I/O core gets its own ``H1Options``), the app, the connection
registry and the books (requests in flight, served and timed out, request hooks, the access
log). It is touched only on the server's event loop.

``Connection`` is the base of the HTTP/1.1 and WebSocket transports: it joins and leaves the
registry, batches writes per loop turn (``batch.py``), tracks backpressure both ways (writes
paused by the transport → ``drain()`` waits; reading paused on request), holds one deadline
that the server's sweep checks a few times a second, and offers the server ``shutdown()``
(retire gracefully), ``abort()`` (cancel the app, drop the connection) and ``task`` (the app
task to wait for at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from asyncio import Task
from contextvars import Context
from typing import TYPE_CHECKING, Any

from uvworker.errors import REQUEST_TIMEOUT
from uvworker.protocols.batch import CountingBatch, Outbox, WriteBatch

if TYPE_CHECKING:
    from uvworker.config import Config
    from uvworker.core.h1 import H1Options
    from uvworker.core.response import HeadDefaults
    from uvworker.logging import AccessLog
    from uvworker.metrics import Counters
    from uvworker.protocols.cycle import RequestCycle

logger = logging.getLogger("uvworker.error")

# After our FIN, how long a connection (HTTP/1.1, HTTP/2) reads and drops input waiting for the client's.
LINGER_TIME = 2.0
# How far past its timeout the keep-alive deadline of a connection going idle is set (two ticks of
# the server's sweep, server.TICK): it is taken from the last tick, not read from the clock.
IDLE_SLACK = 0.2
CLOSED = 0  # the phase every protocol ends in
# The name of every request's app task. Given, because asyncio formats a unique "Task-N" for
# each unnamed task (about 1.5k instructions of a hello-world request's 98k, callgrind).
REQUEST_TASK = "uvworker.request"


def cancel_app(task: asyncio.Future[None], msg: Any = None) -> None:
    """Cancel a request's (or WebSocket session's) app task; once it has ended, its
    CancelledError is taken back out of it. A cancelled task keeps the error it ended with,
    whose traceback holds the app's frames, which hold the request cycle, which holds the
    task: a reference cycle for every cancelled request, which only the collector would free."""
    task.cancel(msg)
    task.add_done_callback(drop_cancellation)


def drop_cancellation(task: asyncio.Future[None]) -> None:
    """A done callback for a task that may have been cancelled (see cancel_app)."""
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()  # hands the error over (and lets go of it), to be dropped here


def input_waiting(transport: asyncio.BaseTransport) -> bool:
    """Whether the client's bytes wait in the kernel, not read yet: a request sent on a
    connection accepted in the very loop turn in which the server began to stop (a peek;
    only called when stopping)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        probe = socket.socket(fileno=sock.fileno())
    except OSError:
        return False
    try:
        return bool(probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # b"": the client's FIN
    except OSError:  # nothing there (EAGAIN), or the socket is gone
        return False
    finally:
        probe.detach()  # the fd stays the transport's


class ServerState:
    """Shared by every connection of one server."""

    def __init__(
        self, config: Config, loop: asyncio.AbstractEventLoop, app: Any, h1: H1Options,
        defaults: HeadDefaults, access_log: AccessLog | None,
    ) -> None:
        self.config = config  # transports read their timeouts and limits here
        self.loop = loop
        self.app = app
        # An app offering serve_cycle(cycle) takes an HTTP/1.1 request cycle without an ASGI task: the WSGI
        # adapter (its app runs on a thread; the loop only writes what the thread answers).
        self.direct: Callable[[Any], None] | None = getattr(app, "serve_cycle", None)
        # Whether an HTTP/1.1 request may be shed or served directly (HTTPConnection._gate).
        self.gated = self.direct is not None or config.limit_concurrency is not None
        self.h1 = h1
        self.defaults = defaults
        self.access_log = access_log
        self.connections: set[Connection] = set()
        self.active_requests = 0
        self.requests_served = 0
        self.request_timeouts = 0  # requests ended by --timeout-request
        self.swept_at = 0.0  # time.monotonic() of the server's last sweep; 0 when not sweeping
        # Their app tasks still running (a WSGI thread that cannot be stopped, a task that
        # ignores the cancellation): the server asks to be replaced when there are too many.
        self.abandoned: set[asyncio.Task[None]] = set()
        self.accepting_requests = True
        self.closing_idle = False  # the whole server stops: idle connections close at once
        # The deadline of an HTTP/1.1 connection that goes idle (keep-alive) before the next
        # tick of the server's sweep: one float for them all (refresh_idle_deadline), instead
        # of a clock read and a float of each request's own, which its connection keeps until
        # its next request, a cold object by then at 1024 connections (callgrind: 550
        # instructions and 1.1 L2 misses a request).
        self.keep_alive_deadline = loop.time() + config.timeout_keep_alive + IDLE_SLACK
        # The last HTTP/1.1 request cycle made while many connections are open, for the next
        # request (of any connection) once nothing holds it (HTTPConnection.on_request).
        self.spare: RequestCycle | None = None
        self.request_hooks: list[Callable[[Any], None]] = []
        # For metrics, with --metrics-bind only (uvworker.metrics): bytes by the transports,
        # requests by a request hook; without it, nothing is counted and nothing costs.
        self.counters: Counters | None = None
        # Whole HTTP/1.1 responses of eager starts, written in bursts (batch.Outbox).
        self.outbox = Outbox(loop)

    @property
    def lifespan_state(self) -> dict[str, Any]:
        return self.h1.lifespan_state

    def metrics_fields(self) -> dict[str, str]:
        """The heartbeat's metrics fields (none without --metrics-bind)."""
        if self.counters is None:
            return {}
        websockets = sum(1 for conn in self.connections if conn.websocket)
        shed = getattr(self.app, "shed", 0)  # an app that sheds load itself (the WSGI adapter)
        return self.counters.fields(self.active_requests, len(self.connections), websockets, self.request_timeouts, shed)

    def refresh_idle_deadline(self, now: float) -> None:
        """Once a tick, before the deadlines are enforced (server._sweep): ``keep_alive_deadline``
        from ``now``, IDLE_SLACK past the timeout, so that a connection going idle until the
        next tick still gets the whole timeout. When this tick comes later than that (the loop
        was held up), the connections that went idle meanwhile would get less: those holding
        the old value get the new one (a deadline moved later, as the sweep allows)."""
        stale = self.keep_alive_deadline
        timeout = self.config.timeout_keep_alive
        fresh = self.keep_alive_deadline = now + timeout + IDLE_SLACK
        if stale < now + timeout:
            for conn in self.connections:
                if conn.deadline is stale:
                    conn.deadline = fresh

    def start_app(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """One request's app, in a task of its own: in a copy of the current context, or with
        --reset-contextvars a fresh, empty one. Built directly, named, unless the app set a
        task factory on the loop: then the factory makes it, as create_task would."""
        loop = self.loop
        if self.config.reset_contextvars:
            context = Context()
            if loop.get_task_factory() is None:
                return Task(coro, loop=loop, name=REQUEST_TASK, context=context)
            return loop.create_task(coro, context=context)
        if loop.get_task_factory() is None:  # without context=None: a keyword less to parse
            # With loop=: a Task that finds the running loop itself asks the kernel for the
            # process id (3.11 checks it against the loop's, for forks): a getpid syscall per
            # request, ~180 ns here, where the keyword costs ~100 instructions.
            return Task(coro, loop=loop, name=REQUEST_TASK)
        return loop.create_task(coro)

    def shed(self, cycle: Any) -> None:
        """--limit-concurrency is exceeded: ``cycle`` is answered 503 by its protocol, without
        the app, and counted (the caller checks the limit inline, off this call's cost)."""
        cycle.response_started = cycle.response_complete = True
        cycle.status = 503
        if self.counters is not None:
            self.counters.shed += 1

    def request_done(self, record: Any) -> None:
        """One request (or WebSocket session) is over: count it, log it, run the hooks; once
        (``record.finished`` is set then, and later calls do nothing).

        ``record`` has scope, status, response_headers, bytes_sent, start_time, start_clock."""
        if record.finished:
            return
        record.finished = True
        self.active_requests -= 1
        self.requests_served += 1
        if self.access_log is not None:
            self.access_log.log(
                record.scope, record.status, record.response_headers, record.bytes_sent,
                record.start_time, time.perf_counter() - record.start_clock,
            )
        hooks = self.request_hooks
        if hooks:  # most servers have none: no iterator to make
            for hook in hooks:
                hook(record)

    def request_timed_out(self, record: Any) -> None:
        """--timeout-request ended ``record``'s request (its answer is out): count it, log it
        and cancel its app, whose task is kept in ``abandoned`` until it ends."""
        self.request_timeouts += 1
        scope = record.scope
        logger.error(
            "Request timed out after %.1f s (--timeout-request %g): %s %s", time.perf_counter() - record.start_clock,
            self.config.timeout_request, scope.get("method", ""), scope.get("path", ""),
        )
        task = record.task
        if task is not None and not task.done():
            cancel_app(task, REQUEST_TIMEOUT)
            self.abandoned.add(task)
            task.add_done_callback(self.abandoned.discard)


class Connection(asyncio.Protocol):
    task: asyncio.Task[None] | None = None
    transport: asyncio.Transport

    websocket = False  # a WebSocket session (for the metrics' count)

    # Slots (a subclass without its own has a dict as well): one block, attributes at fixed offsets.
    __slots__ = (
        "state", "config", "loop", "phase", "deadline", "write_paused", "reading_paused", "_drain_waiters", "transport",
        "batch", "batching", "__weakref__",  # as any object's: tests (tests/freed.py) and tools watch cycles go
    )

    def __init__(self, state: ServerState) -> None:
        # Every attribute a protocol sets, here (see RequestCycle.__init__ for why): uvloop
        # makes the protocols of a burst of accepted connections before any connection_made.
        self.state = state
        self.config = state.config
        self.loop = state.loop
        self.phase = CLOSED
        self.deadline = 0.0  # 0: none running; else the loop time the sweep acts at
        self.write_paused = False
        self.reading_paused = False
        # A list once a writer waits (few connections ever have one: none is made for the others).
        self._drain_waiters: list[asyncio.Future[None]] | tuple[()] = ()
        self.transport = None  # type: ignore[assignment]  # attach()
        self.batch: WriteBatch = None  # type: ignore[assignment]  # attach()
        # Whether a write must go through the batch: it may hold pieces (write_soon since the
        # last whole write through it), or it counts. When not, a whole response may go to the
        # transport without the batch being read (HTTPConnection.send_body): at 1024
        # connections it is a cold object by its connection's turn (2.4 L2 misses a request).
        self.batching = False

    def attach(self, transport: asyncio.Transport, batch_limit: int) -> None:
        """Take ``transport`` (new, or handed over by another protocol) and join the registry."""
        self.transport = transport
        counters = self.state.counters
        if counters is None:
            self.batch = WriteBatch(transport, self.loop, batch_limit)
        else:
            self.batch = CountingBatch(transport, self.loop, batch_limit, counters)
        self.batching = counters is not None
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.deadline = 0.0
        self.state.connections.discard(self)
        self._release_writers()

    # -- bytes out ------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Write now, after whatever write_soon() batched."""
        if self.phase != CLOSED:
            self.release()
            self.batch.write(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        """Write now, by reference (one writev): for large pieces, which a join would copy."""
        if self.phase != CLOSED:
            self.release()
            self.batch.writelines(parts)

    def write_soon(self, data: bytes) -> None:
        """Batch a piece: the pieces of one loop turn go out in one write (bounded)."""
        if self.phase != CLOSED:
            self.release()
            self.batching = True
            self.batch.add(data)

    def release(self) -> None:
        """Write the responses the outbox holds now: what this connection writes next, or
        its close, comes after its own."""
        outbox = self.state.outbox
        if outbox.held:
            outbox.write()

    # -- flow control ------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release_writers()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.write_paused and self.phase != CLOSED:
            waiter = self.loop.create_future()
            if self._drain_waiters:
                self._drain_waiters.append(waiter)  # type: ignore[union-attr]
            else:
                self._drain_waiters = [waiter]
            await waiter

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, ()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.phase != CLOSED:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.phase != CLOSED:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- ending -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close after what is written and batched has gone out. The transport waits for that
        without a bound: a client that takes none of it for --timeout-send is dropped."""
        if self.phase != CLOSED:
            self.release()
            self.batch.flush()
            self.phase = CLOSED
            self.deadline = 0.0
            transport = self.transport
            transport.close()
            unsent = transport.get_write_buffer_size()
            if unsent:
                self.loop.call_later(self.config.timeout_send, _drop_if_stalled, transport, unsent, self.config.timeout_send)

    def drop(self) -> None:
        """Close now, discarding unsent bytes (a client that does not read them)."""
        self.phase = CLOSED
        self.deadline = 0.0
        self.transport.abort()

    def abort(self) -> None:
        """Shutdown's last resort: cancel the app and drop the connection."""
        if self.task is not None:
            cancel_app(self.task)
        self.drop()

    def shutdown(self, close_idle: bool = False) -> None:
        """Retire: finish what is in flight, start nothing new. ``close_idle``: the whole
        server is stopping, so an idle connection is closed now instead of waiting for its
        next request."""
        raise NotImplementedError  # each protocol retires in its own way

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep when ``deadline`` is set."""

    def in_flight(self) -> tuple[Any, ...]:
        """The requests (or WebSocket session) this connection serves now: records with
        ``scope`` and ``start_clock`` (for a hung worker's report, ``uvworker.inflight``)."""
        return ()

    def expire_requests(self, cutoff: float) -> None:
        """Called by the server's sweep with --timeout-request: end each request whose cycle
        started (``start_clock``) before ``cutoff`` and whose response is not complete.
        WebSocket sessions are exempt."""


def _drop_if_stalled(transport: asyncio.Transport, unsent: int, delay: float) -> None:
    """A closing transport still holding ``unsent`` bytes ``delay`` ago: dropped if its client
    took none of them since, else looked at again after another ``delay``."""
    left = transport.get_write_buffer_size()
    if left >= unsent:
        transport.abort()
    elif left:
        asyncio.get_running_loop().call_later(delay, _drop_if_stalled, transport, left, delay)


def address(address: Any) -> Any:
    """A transport's peername or sockname as an ASGI scope's (host, port), or None."""
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    if isinstance(address, str) and address:
        return (address, None)
    return None
