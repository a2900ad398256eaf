"""Gunicorn worker classes: ``gunicorn -k uvworker.Worker app:app`` (``uvworker.H11Worker``
for pure Python: h11 and asyncio). This module is the worker's lifecycle; the settings
mapping is uvworker.gunicorn_settings, the per-request hooks and loggers uvworker.gunicorn_hooks.

Each Gunicorn worker process runs one uvworker ``Server`` on the sockets the arbiter bound.
Where each part of Gunicorn's configuration goes:

    Gunicorn                          in the worker
    --------------------------------  ------------------------------------------------------
    a setting named by a row's        that uvworker setting (``settings_from_gunicorn``);
      ``Setting.gunicorn`` slot       ``UVWORKER_<NAME>`` fills in what Gunicorn leaves at its
                                      default or has no setting for
    timeout                           ``notify()`` once a second from a task on the event loop
                                      (lifespan startup and shutdown included): a blocked loop
                                      stops the heartbeat, the arbiter sends SIGABRT and
                                      replaces the worker
    max_requests (+ jitter)           ``self.nr`` counts requests as they reach the app (also
                                      for hooks, which read it); the last one of the budget
                                      calls ``Server.retire()``
    (UVWORKER_TIMEOUT_REQUEST)        too many requests still running after it ended them:
                                      the worker retires, the arbiter starts another
    forwarded_allow_ips,              applied per request in front of the app, where the peer
      secure_scheme_headers,          address is still known (gunicorn_hooks.front); SCRIPT_NAME
      forwarder_headers, root_path    (environment, trusted header) sets the root path, or else
                                      Gunicorn's root_path (the path unchanged, as in its ASGI worker)
    pre_request / post_request        in front of the app / a ``ServerState`` request hook
    accesslog, access_log_format,     Gunicorn's logger, fed by request hooks
      logger_class                      (gunicorn_hooks.request_hooks)
    errorlog, loglevel                "uvworker.error" records go to Gunicorn's error logger
    certfile, ..., ssl_context        Gunicorn's own context factory and hook
    preload_app, reload, user,        the arbiter and Gunicorn's base worker, unchanged
      group, umask, post_worker_init,
      worker_exit

Lifecycle. The arbiter calls ``check_config`` before it forks (a setting we cannot use stops
Gunicorn there) and then imports, once, every module a worker may need (``warm_imports``), so
that a worker switched to ``user`` needs to read only the app. In the worker, Gunicorn's
``init_process`` loads the app (``load_wsgi``) and calls ``run``: the Server serves until
TERM, the request budget, a changed parent or the reloader retire it.

Signals, once the event loop runs: TERM graceful (bounded by graceful_timeout); INT and QUIT
run worker_int, then the quick stop (connections closed, lifespan shutdown still runs); USR1
reopens the log files; WINCH is ignored. ABRT keeps a plain ``signal.signal`` handler, so it
runs even while the event loop is blocked (Python runs signal handlers between bytecodes,
not on the loop): it logs where the main thread was and the requests in flight
(``uvworker.inflight``), runs worker_abort and exits. Before
that, ``faulthandler`` writes every thread's stack to stderr from C, which works even when
the loop is stuck inside C code that holds the GIL.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

import gunicorn
from gunicorn.arbiter import Arbiter
from gunicorn.sock import ssl_context as gunicorn_ssl_context
from gunicorn.workers.base import Worker as GunicornWorker


def _unshadow_stdlib() -> None:
    """Take Gunicorn's package directory off sys.path, before anything imports ``http``.

    Started as ``python -m gunicorn``, the master re-executes itself on USR2 (binary upgrade)
    as ``python .../gunicorn/__main__.py``, and a script's directory comes first on sys.path:
    Gunicorn's own ``http`` package (and ``app``, ``workers``...) then shadows the standard
    library's ``http``, which uvworker, its parsers and most apps import. gthread happens not
    to import it; we must boot there too. No module is meant to be imported from inside a
    package's directory, so nothing else is lost."""
    own = os.path.dirname(os.path.abspath(gunicorn.__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != own]
    shadow = getattr(sys.modules.get("http"), "__file__", None) or ""
    if os.path.abspath(shadow).startswith(own + os.sep):
        for name in [name for name in sys.modules if name == "http" or name.startswith("http.")]:
            del sys.modules[name]


_unshadow_stdlib()

# (imported after the repair above: they import the standard library's http)
from uvworker.config import Config, offer_alpn
from uvworker.errors import ConfigError
from uvworker.gunicorn_hooks import access_log, front, hook_set, needs_app_environ, request_hooks, route_error_log
from uvworker.gunicorn_objects import GunicornRequest, gunicorn_request
from uvworker.gunicorn_settings import settings_from_gunicorn, standalone_only_set
from uvworker.inflight import HEARTBEAT_INTERVAL, Watchdog, hung_report, watchdog_delay
from uvworker.interfaces.wsgi import WSGIAdapter
from uvworker.protocols.http import HTTPConnection
from uvworker.server import Server
from uvworker.settings import BY_NAME
from uvworker.warm_imports import warm_imports

__all__ = ["Worker", "H11Worker"]

# How long a worker stopped by TERM leaves idle keep-alive connections open (at most their
# keep-alive timeout), for a request a client may be sending: Gunicorn's gthread worker waits
# as long. The worker cannot tell a reload's TERM from a shutdown's, and the arbiter blocks on
# old workers during a reload: a long --keep-alive must not hold it for the graceful timeout.
STOP_KEEPALIVE_LINGER = 2.0


class Worker(GunicornWorker):
    """uvworker under Gunicorn: httptools and uvloop when installed, else h11 and asyncio."""

    # uvworker settings forced by this worker class, over Gunicorn's and the environment's.
    uvworker_settings: ClassVar[dict[str, Any]] = {}

    server: Server | None = None
    config: Config | None = None
    _pre_request: Callable[[Any, GunicornRequest], None] | None = None  # Gunicorn's hook, when it runs

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Run by the arbiter before it forks: stop Gunicorn at once on settings we cannot use."""
        try:
            config = Config(None, **(settings_from_gunicorn(cfg, os.environ) | cls.uvworker_settings))
            access_log(cfg)
        except (ConfigError, ValueError, TypeError) as err:
            raise RuntimeError(f"uvworker: {err}") from None
        warm_imports(config)  # in the arbiter, before workers fork and switch user
        for line in standalone_only_set(os.environ):
            log.warning("uvworker: %s", line)
        if 0 < cfg.timeout < 2:
            log.warning("uvworker heartbeats once a second: a timeout under 2 s may replace healthy workers.")

    # -- boot (in the worker process, called by Gunicorn's init_process) ----------------------
    def init_signals(self) -> None:
        super().init_signals()  # Gunicorn's handlers cover the boot; the event loop takes over later
        # SIGABRT is one of faulthandler's fatal signals: it dumps every thread's stack from C,
        # then hands the signal on to handle_abort (installed above) and disarms itself.
        faulthandler.enable(file=sys.stderr, all_threads=True)

    def load_wsgi(self) -> None:
        try:
            self.wsgi = self.app.wsgi()
        except SyntaxError as err:
            if not self.cfg.reload:
                raise
            # As Gunicorn does under --reload: serve the error until the file is fixed.
            self.log.exception(err)
            if self.reloader is not None and err.filename:
                self.reloader.add_extra_file(err.filename)
            self.wsgi = _error_app("".join(traceback.format_exception(err)))

    def run(self) -> None:
        try:
            config = self._load_config()
        except (ConfigError, OSError, ValueError) as err:
            self.log.error("uvworker: %s", err)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        server = self.server = Server(
            config, on_ready=self._on_ready, on_tick=self._on_tick, on_stuck=self._on_term,
            install_signal_handlers=False,
        )
        # The hung report also comes from a thread, at half the timeout (uvworker.inflight).
        watchdog = Watchdog(lambda: server.state, watchdog_delay(config.timeout_worker), self.log.critical)
        watchdog.start()
        with asyncio.Runner(loop_factory=config.loop_factory) as runner:
            runner.run(self._serve(server))
        watchdog.stop()
        if server.startup_failed:  # the app's lifespan startup failed: stop Gunicorn, not loop
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def _load_config(self) -> Config:
        cfg = self.cfg
        settings = settings_from_gunicorn(cfg, os.environ) | self.uvworker_settings
        proxy_headers = settings.get("proxy_headers", BY_NAME["proxy_headers"].default)
        # Requests are logged through Gunicorn's logger (request hooks), and proxy headers are
        # applied in front of the app, where secure_scheme_headers are too.
        config = Config(self.wsgi, **(settings | {"access_log": False, "proxy_headers": False}))
        config.load()
        if cfg.is_ssl:
            config.ssl_context = gunicorn_ssl_context(cfg)  # honours the ssl_context hook
            offer_alpn(config.ssl_context, config.serve_h2)
        route_error_log(self.log, config.log_level)
        if isinstance(config.loaded_app, WSGIAdapter) and needs_app_environ(self):
            config.loaded_app.keep_environ = True  # as Gunicorn's: the environ the app saw, its keys
        budget = self.max_requests < sys.maxsize
        # Gunicorn's default pre_request only logs at debug level: skip it unless it would.
        debug = getattr(self.log, "loglevel", logging.INFO) <= logging.DEBUG
        self._pre_request = cfg.pre_request if hook_set(cfg, "pre_request") or debug else None
        # worker.nr is counted for the budget, and for hooks, which may read it.
        counted = budget or self._pre_request is not None or hook_set(cfg, "post_request")
        before = self._before_app if counted else None
        config.loaded_app = front(
            config.loaded_app, trusted=config.forwarded_allow, proxy_headers=proxy_headers,
            secure_scheme_headers=cfg.secure_scheme_headers, before=before,
            script_name=os.environ.get("SCRIPT_NAME", ""), script_name_header="SCRIPT_NAME" in cfg.forwarder_headers,
            root_path=cfg.root_path if "root_path" in cfg.settings else "",
        )
        self.config = config
        return config

    def _before_app(self, scope: dict[str, Any], cycle: Any) -> None:
        """Each request, as it reaches the app, in the order of Gunicorn's workers: pre_request
        (if it raises, the request is a 500 and not counted), then ``nr`` and the budget."""
        if self._pre_request is not None:
            request = gunicorn_request(scope, cycle, self.cfg)
            self._pre_request(self, request)
            if request.must_close and isinstance(getattr(cycle, "stream", None), HTTPConnection):
                # req.force_close(): Gunicorn answers with Connection: close, then closes.
                cycle.stream.core.keep_alive = False
        self.nr += 1
        if self.nr == self.max_requests:
            self.log.info("Autorestarting worker after current request.")
            assert self.server is not None
            self.server.retire()  # at once: the listeners close, this response says close

    # -- callbacks from the server, on the event loop ------------------------------------------
    async def _serve(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_quit)
        loop.add_signal_handler(signal.SIGQUIT, self._on_quit)
        loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        loop.add_signal_handler(signal.SIGWINCH, self.log.debug, "worker: SIGWINCH ignored.")
        if not self.alive:  # TERM arrived while the app was loading
            server.should_exit = True
        beat = loop.create_task(self._heartbeat())
        try:
            await server.serve(sockets=[getattr(sock, "sock", sock) for sock in self.sockets])
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        """Gunicorn's heartbeat, from the event loop for the whole of serve(): lifespan startup
        and shutdown included, so that a slow async startup (a model loading) is not taken for
        a hung worker; a blocked loop still stops it."""
        while True:
            self.notify()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _on_ready(self) -> None:
        # Registered as the listeners start: no request can finish in the same loop turn.
        assert self.server is not None and self.server.state is not None
        self.server.state.request_hooks.extend(request_hooks(self))

    def _on_tick(self, server: Server) -> None:
        if server.should_exit:
            return
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            server.retire()
        elif not self.alive:  # the reloader saw a change
            server.retire()

    def _on_term(self) -> None:
        self.alive = False
        server = self.server
        if server is not None:
            server.retire()  # graceful, even when a max_requests retirement is under way
            if server.state is not None:  # then idle connections close, after the linger
                server.state.loop.call_later(STOP_KEEPALIVE_LINGER, server.retire, True)

    def _on_quit(self) -> None:
        if self.server is None or self.server.force_exit:
            return
        self.alive = False
        self.cfg.worker_int(self)
        self.server.handle_signal(signal.SIGQUIT)  # quick: lifespan shutdown still runs

    def handle_abort(self, sig: int, frame: Any) -> None:
        """SIGABRT from the arbiter (heartbeat timeout): runs outside the event loop."""
        self.alive = False
        state = self.server.state if self.server is not None else None
        self.log.critical("Worker aborted (pid: %s); %s", self.pid, hung_report(state, frame))
        self.cfg.worker_abort(self)
        sys.exit(1)


class H11Worker(Worker):
    """Pure Python: the h11 parser on the asyncio event loop."""

    uvworker_settings = {"http": "h11", "loop": "asyncio"}


def _error_app(text: str) -> Any:
    """An ASGI app answering 500 with ``text`` (a SyntaxError under --reload)."""
    body = text.encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011})

    return app
