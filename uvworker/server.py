"""serve(sockets): lifespan, accepting, the connection registry, draining and retiring.

``Server`` runs one event loop in one process. The standalone CLI runs it directly; the
supervisor and the Gunicorn worker run one per worker process and talk to it through the
``on_ready`` / ``on_tick`` callbacks and :meth:`Server.retire`. It makes the ``ServerState``
every connection shares and hands it to them; the protocols never import this module.

Shutdown has two speeds. Graceful (SIGTERM, retire(), should_exit): stop accepting, let every
request in flight finish and answer it with ``Connection: close``, then run lifespan
shutdown, all bounded by ``timeout_graceful_shutdown``. What happens to an idle keep-alive
connection depends on whether anyone else will serve its next request:

    retire()                    the server goes on elsewhere (max requests, reload: other
                                workers keep serving): idle connections stay open until their
                                next request (answered with Connection: close) or their
                                keep-alive timeout, because closing them races with a request
                                the client may be sending at that moment
    retire(close_idle=True),    the whole server stops: idle connections are closed at once
    SIGTERM, SIGINT             (gracefully: our FIN first, then the client's)

Quick (SIGQUIT, a second SIGINT, force_exit): close every connection and cancel the apps at
once, then still run lifespan shutdown, for QUICK_LIFESPAN_SHUTDOWN at most. A quick stop
signalled while lifespan startup or shutdown waits for the app cancels that wait at once: the
way out of an app that never answers.

``hold()`` is the first half of a retirement without the exit: a worker at its budget whose
replacement is not ready yet (``supervisor.budget``) stops accepting and answers what its
connections send last, then waits for ``retire()`` or, if the replacement could not start,
``resume()``, which listens again on the same sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvworker import memtrace
from uvworker.core.h1 import H1Options
from uvworker.core.parsers import Limits
from uvworker.collector import tune_collector
from uvworker.core.response import HeadDefaults
from uvworker.deadlines import DeadlineSweep
from uvworker.errors import ConfigError
from uvworker.inflight import HEARTBEAT_INTERVAL
from uvworker.logging import reopen_files
from uvworker.malloc import tune_heap
from uvworker.metrics import Counters
from uvworker.protocols.connection import LINGER_TIME, ServerState
from uvworker.protocols.http import HTTPConnection

if TYPE_CHECKING:
    from uvworker.config import Config
    from uvworker.lifespan import Lifespan

logger = logging.getLogger("uvworker.error")

TICK = 0.1  # how often the main loop looks at should_exit and connection deadlines
# A quick stop (QUIT, a second INT) still runs lifespan shutdown, for this long at most (or
# --timeout-graceful-shutdown, if shorter): then the app's lifespan task is cancelled.
QUICK_LIFESPAN_SHUTDOWN = 2.0


class Server:
    def __init__(
        self,
        config: Config,
        *,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[Server], None] | None = None,
        on_stuck: Callable[[], None] | None = None,
        install_signal_handlers: bool = True,
        metrics_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.metrics_socket = metrics_socket  # --metrics-bind, in the one-process shape
        self.on_ready = on_ready
        self.on_tick = on_tick
        self.on_stuck = on_stuck  # asks the supervisor for a replacement (see _check_abandoned)
        self.install_signal_handlers = install_signal_handlers
        self.started = False
        self.should_exit = False
        self.force_exit = False
        self.startup_failed = False
        self.state: ServerState | None = None
        self._deadlines = DeadlineSweep(shortest_deadline(config))  # made anew for each serve()
        self._servers: list[asyncio.base_events.Server] = []
        self._sockets: list[socket.socket] = []  # what the listeners listen on
        self._held: list[socket.socket] | None = None  # hold(): copies to listen on again
        self._interrupts = 0
        self._close_idle = False
        self._stuck = False
        self._delaying = False  # SIGTERM came; --shutdown-delay runs before the drain
        self._metrics_server: asyncio.base_events.Server | None = None
        self._lifespan: Lifespan | None = None

    @property
    def requests_served(self) -> int:
        return self.state.requests_served if self.state else 0

    @property
    def draining(self) -> bool:
        """Stopping, or about to (during --shutdown-delay): /readyz says 503."""
        return self.should_exit or self._delaying

    @property
    def active_requests(self) -> int:
        return self.state.active_requests if self.state else 0

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.load()
        with asyncio.Runner(loop_factory=self.config.loop_factory) as runner:
            runner.run(self.serve(sockets))

    def retire(self, close_idle: bool = False) -> None:
        """Stop gracefully: stop accepting, finish in-flight requests, then return from serve().
        ``close_idle``: the whole server is stopping (nobody else will serve the next request
        of an idle connection), so idle keep-alive connections close at once.

        Called on the event loop (e.g. by a request budget counted in front of the app) it
        takes effect at once: the listeners close and every connection answers its current or
        next request with ``Connection: close``. Called from elsewhere, within a tick."""
        self.should_exit = True
        self._close_idle = self._close_idle or close_idle
        if self.started and self.state is not None and _running_loop() is self.state.loop:
            self._stop_accepting()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        from uvworker.lifespan import Lifespan

        tune_heap()
        config = self.config
        config.load()
        loop = asyncio.get_running_loop()
        lifespan = self._lifespan = Lifespan(config.loaded_app, config.lifespan, logger)
        self.state = make_state(config, loop, lifespan.state)
        self._deadlines = DeadlineSweep(shortest_deadline(config))  # (on this loop's clock)
        if self.install_signal_handlers:
            self._install_signal_handlers(loop)
        if self.metrics_socket is not None:
            from uvworker.exporter import serve_in_loop

            self._metrics_server = await serve_in_loop(self.metrics_socket, self)
        try:
            await self._run(sockets, lifespan)
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()

    async def _run(self, sockets: list[socket.socket] | None, lifespan: Lifespan) -> None:
        config, state = self.config, self.state
        assert state is not None
        if not await lifespan.startup():
            self.startup_failed = True
            await lifespan.shutdown()  # only reaps the app's lifespan task
            return
        try:
            if not self.should_exit:
                tune_collector()  # the app is loaded and started: what exists now stays
                await self._listen(sockets)
                state.swept_at = time.monotonic()  # watched from now on, not from the first sweep
                self.started = True
                self._log_started()
                memtrace.start(config.trace_memory)  # after startup: growth from here on
                if self.on_ready is not None:
                    self.on_ready()
                await self._main_loop()
            await self._drain()
        finally:
            state.swept_at = 0.0  # no more sweeps: the watchdog (uvworker.inflight) stands down
            self._close_listeners()
            for sock in self._held or ():
                sock.close()
            bound = None
            if self.force_exit:  # quick: the app's shutdown runs, briefly (a later signal: at once)
                timeout = config.timeout_graceful_shutdown
                grace = QUICK_LIFESPAN_SHUTDOWN if timeout is None else min(QUICK_LIFESPAN_SHUTDOWN, timeout)
                bound = state.loop.call_later(grace, lifespan.abandon)
            await lifespan.shutdown()
            if bound is not None:
                bound.cancel()

    async def _listen(self, sockets: list[socket.socket] | None) -> None:
        config = self.config
        state = self.state
        assert state is not None
        if sockets is None:
            sockets = listen(config)
        self._sockets = sockets
        loop = state.loop

        def factory() -> HTTPConnection:
            return HTTPConnection(state)

        for sock in sockets:
            server = await loop.create_server(
                factory, sock=sock, ssl=config.ssl_context, backlog=config.backlog, start_serving=True
            )
            self._servers.append(server)

    def _log_started(self) -> None:
        for server in self._servers:
            for sock in server.sockets:
                address = sock.getsockname()
                scheme = "https" if self.config.ssl_context else "http"
                if sock.family == socket.AF_UNIX:
                    where = f"unix socket {address}"
                elif sock.family == socket.AF_INET6:
                    where = f"{scheme}://[{address[0]}]:{address[1]}"
                else:
                    where = f"{scheme}://{address[0]}:{address[1]}"
                logger.info("Listening on %s (pid %d)", where, os.getpid())

    async def _main_loop(self) -> None:
        state = self.state
        assert state is not None
        next_tick = 0.0
        counters = state.counters
        while not self.should_exit:
            expected = time.monotonic() + TICK
            await asyncio.sleep(TICK)
            now = time.monotonic()
            if counters is not None and now - expected > counters.lag:  # the loop lag metrics report
                counters.lag = now - expected
            _sweep(state, self._deadlines)
            if now >= next_tick:
                next_tick = now + HEARTBEAT_INTERVAL
                if state.abandoned:
                    self._check_abandoned()
                if self.on_tick is not None:
                    self.on_tick(self)

    def _check_abandoned(self) -> None:
        """More requests ended by --timeout-request still running than --wsgi-threads (threads
        that cannot be stopped, holding memory and connections): ask to be replaced, once. The
        worker retires gracefully, like at the end of a budget."""
        state = self.state
        assert state is not None
        count, limit = len(state.abandoned), self.config.wsgi_threads
        if self._stuck or count <= limit:
            return
        self._stuck = True
        if self.on_stuck is None:
            logger.error("%d requests ended by --timeout-request are still running (more than --wsgi-threads "
                         "%d); without a supervisor (--workers) nothing replaces this process.", count, limit)
            return
        logger.error("%d requests ended by --timeout-request are still running (more than --wsgi-threads %d): "
                     "this worker asks to be replaced.", count, limit)
        self.on_stuck()

    async def _drain(self) -> None:
        """Stop accepting, then wait (bounded) for connections to finish their work."""
        state = self.state
        assert state is not None
        self._stop_accepting()
        if state.connections:
            logger.info(
                "Shutting down: %d connection(s) open, %d request(s) in flight.",
                len(state.connections), state.active_requests,
            )
        timeout = self.config.timeout_graceful_shutdown
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while state.connections and not self.force_exit:
            if time.monotonic() >= deadline:
                logger.warning(
                    "Graceful shutdown timed out after %s s; closing %d connection(s).", timeout, len(state.connections)
                )
                break
            await asyncio.sleep(TICK)
            _sweep(state, self._deadlines)
            if self.on_tick is not None:
                self.on_tick(self)
        tasks = [conn.task for conn in state.connections if conn.task is not None]
        for conn in list(state.connections):
            conn.abort()
        if tasks:  # let cancelled apps run their cleanup before lifespan shutdown
            await asyncio.wait(tasks, timeout=5)

    def hold(self) -> None:
        """Stop accepting as a retirement does (every connection answers its current or next
        request with Connection: close), but keep serving until ``retire()`` or ``resume()``.
        On the event loop, once started."""
        if self.should_exit or self._held is not None or not self.started:
            return
        self._held = [sock.dup() for sock in self._sockets]  # the listeners close theirs
        self._stop_accepting()

    def resume(self) -> None:
        """Accept again after ``hold()``. On the event loop."""
        held, self._held = self._held, None
        if held is None or self.should_exit or self.state is None:
            for sock in held or ():
                sock.close()
            return
        self.state.accepting_requests = True
        self.state.loop.create_task(self._listen(held))

    def _stop_accepting(self) -> None:
        state = self.state
        assert state is not None
        state.accepting_requests = False
        state.closing_idle = close_idle = self._close_idle
        loop = state.loop
        servers, self._servers = self._servers, []
        # A retirement may come in the middle of a loop turn's I/O callbacks (a request budget
        # counted in an eager start, inside data_received) with a listener's own callback, for
        # connections waiting in its backlog, still to come in that turn: a listener closed
        # (or, in asyncio, no longer read) now would leave them to be reset. Let it accept
        # them: they are served, and their answers say close.
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            # asyncio accepts in one turn and builds the connection's transport in a task the
            # next; a server closed in between drops that socket (a reset too). Stop reading
            # the listeners the next turn, close them the turn after, once those tasks ran.
            loop.call_soon(_stop_reading, loop, servers)
        else:  # uvloop builds the transport as it accepts: closed the next turn, before its reads
            loop.call_soon(_close_all, servers)
        for conn in list(state.connections):
            conn.shutdown(close_idle)

    def _close_listeners(self) -> None:
        _close_all(self._servers)

    # -- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, self.handle_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, reopen_files)
        loop.add_signal_handler(signal.SIGUSR2, memtrace.log_report)
        # Without a supervisor there is nothing to reload onto or scale: say so instead of
        # dying (HUP), or being stopped until a SIGCONT (TTIN, TTOU: their default action).
        loop.add_signal_handler(signal.SIGHUP, logger.warning, "SIGHUP ignored: reloading needs --workers.")
        for sig in (signal.SIGTTIN, signal.SIGTTOU):
            loop.add_signal_handler(sig, logger.warning, f"{sig.name} ignored: changing the number of workers "
                                                         "needs --workers.")

    def handle_signal(self, sig: int) -> None:
        """TERM: graceful. INT: graceful, a second one quick. QUIT: quick. The whole server
        stops, so idle keep-alive connections are closed at once."""
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self.force_exit = True
        elif sig == signal.SIGQUIT:
            self.force_exit = True
        elif sig == signal.SIGTERM and not self.should_exit and not self._delaying and self.config.shutdown_delay:
            # Not ready any more, but serve on normally while load balancers notice.
            self._delaying = True
            delay = self.config.shutdown_delay
            logger.info("SIGTERM: not ready any more; serving %g s more before the graceful stop.", delay)
            assert self.state is not None
            self.state.loop.call_later(delay, self._delay_over)
            return
        if self.should_exit and sig == signal.SIGTERM:
            self.force_exit = True
        if self.force_exit and self._lifespan is not None:
            self._lifespan.abandon()  # the app's startup or shutdown may never answer
        self.retire(close_idle=True)

    def _delay_over(self) -> None:
        if not self.should_exit:  # (a second SIGTERM may have started the drain already)
            self.retire(close_idle=True)


def make_state(config: Config, loop: asyncio.AbstractEventLoop, lifespan_state: dict[str, Any]) -> ServerState:
    """What every connection of a server shares, from the loaded settings."""
    h1 = H1Options(
        parser=config.http_parser,
        limits=Limits(config.limit_request_line, config.limit_request_fields, config.limit_request_field_size,
                      config.h11_max_incomplete_event_size, config.limit_request_head),
        root_path=config.root_path,
        proxy_headers=config.proxy_headers,
        forwarded_allow=config.forwarded_allow,
        proxy_protocol=config.proxy_protocol,
        proxy_allow=config.proxy_allow,
        websocket=config.ws != "none",
        keep_alive=bool(config.timeout_keep_alive),
        lifespan_state=lifespan_state,
    )
    fixed = ([(b"server", b"uvworker")] if config.server_header else []) + list(config.default_headers)
    defaults = HeadDefaults(fixed, config.date_header)
    state = ServerState(config, loop, config.loaded_app, h1, defaults, config.access_log_writer)
    if config.metrics_bind:
        state.counters = Counters()
        state.request_hooks.append(state.counters.request_done)
    return state


def shortest_deadline(config: Config) -> float:
    """The least ``delay`` a connection's deadline is set with (now + delay): its keep-alive,
    header, body and send timeouts and the linger after our FIN (HTTP/1.1 and HTTP/2 alike).
    The sweep looks at a connection whose deadline is further off once per this (see
    uvworker.deadlines): a deadline set with a shorter delay must be counted here."""
    return min(config.timeout_keep_alive, config.timeout_request_header, config.timeout_request_body,
               config.timeout_send, LINGER_TIME)


def _sweep(state: ServerState, deadlines: DeadlineSweep) -> None:
    """Once a tick: the Date header, the deadlines that have come and, with --timeout-request,
    the age of every connection's request (a request costs no timer of its own)."""
    state.defaults.refresh(time.time())
    state.swept_at = time.monotonic()
    now = state.loop.time()
    state.refresh_idle_deadline(now)  # first: no deadline it hands out is cut short by this sweep
    deadlines.run(state.connections, now)
    timeout = state.config.timeout_request
    if timeout:
        cutoff = time.perf_counter() - timeout
        for conn in list(state.connections):
            conn.expire_requests(cutoff)


def listen(config: Config) -> list[socket.socket]:
    """The listening sockets the settings name (--fd, else --uds, else --host/--port). A --uds
    socket is for every user (0666, as uvicorn's), less what --umask masks (as Gunicorn's)."""
    from supervisor.sockets import ListenError
    from supervisor.sockets import listen as open_listener

    mode = 0o666 & ~(config.umask or 0)
    try:
        return [open_listener(config.host, config.port, config.uds, config.fd, config.backlog, uds_mode=mode)]
    except ListenError as err:
        raise ConfigError(str(err)) from err


def _stop_reading(loop: asyncio.AbstractEventLoop, servers: list[asyncio.base_events.Server]) -> None:
    for server in servers:
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
    loop.call_soon(_close_all, servers)


def _close_all(servers: list[asyncio.base_events.Server]) -> None:
    for server in servers:
        server.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
