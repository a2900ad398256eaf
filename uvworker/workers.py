"""Gunicorn worker classes: ``gunicorn -k uvworker.Worker app:app`` (``uvworker.H11Worker``
for pure Python: h11 and asyncio).

Each Gunicorn worker process runs one uvworker ``Server`` on the sockets the arbiter bound.
Where each part of Gunicorn's configuration goes:

    Gunicorn                          in the worker
    --------------------------------  ------------------------------------------------------
    a setting named by a row's        that uvworker setting (``settings_from_gunicorn``: the
      ``Setting.gunicorn`` slot       one settings table, values adapted by ``_ADAPT``);
                                      ``UVWORKER_<NAME>`` fills in what Gunicorn leaves at its
                                      default or has no setting for
    timeout                           ``notify()`` from ``Server.on_tick``, i.e. from the event
                                      loop: a blocked loop stops the heartbeat, the arbiter
                                      sends SIGABRT and replaces the worker
    max_requests (+ jitter)           ``self.nr`` counts requests as they reach the app; the
                                      last one of the budget calls ``Server.retire()``
    forwarded_allow_ips,              applied per request in front of the app, where the peer
      secure_scheme_headers           address is still known (uvworker's proxy-header rules
                                      plus Gunicorn's secure-scheme headers)
    pre_request / post_request        in front of the app / a ``ServerState`` request hook
    accesslog, access_log_format      Gunicorn's access logger, atoms from uvworker.logging
    errorlog, loglevel                "uvworker.error" records go to Gunicorn's error logger
    certfile, ..., ssl_context        Gunicorn's own context factory and hook
    preload_app, reload, user,        the arbiter and Gunicorn's base worker, unchanged
      group, umask, post_worker_init,
      worker_exit

Signals, once the event loop runs: TERM graceful (bounded by graceful_timeout); INT and QUIT
run worker_int, then the quick stop (connections closed, lifespan shutdown still runs); USR1
reopens the log files; WINCH is ignored. ABRT keeps a plain ``signal.signal`` handler, so it
runs even while the event loop is blocked (Python runs signal handlers between bytecodes,
not on the loop): it logs where the main thread was, runs worker_abort and exits. Before
that, ``faulthandler`` writes every thread's stack to stderr from C, which works even when
the loop is stuck inside C code that holds the GIL.
"""

from __future__ import annotations

import asyncio
import datetime
import faulthandler
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from gunicorn import glogging
from gunicorn.arbiter import Arbiter
from gunicorn.sock import ssl_context as gunicorn_ssl_context
from gunicorn.workers.base import Worker as GunicornWorker

from uvworker.config import Config
from uvworker.errors import ConfigError
from uvworker.logging import AccessLog
from uvworker.protocols.cycle import RequestCycle
from uvworker.proxy import TrustedHosts, apply_proxy_headers
from uvworker.server import Server, warm_imports
from uvworker.settings import BY_NAME, SETTINGS, from_environ

__all__ = ["Worker", "H11Worker", "settings_from_gunicorn"]

# Gunicorn values whose meaning differs from the uvworker setting they map to; the mapping
# itself is the ``gunicorn`` slot of the settings table.
_ADAPT: dict[str, Callable[[Any], Any]] = {
    "keepalive": float,  # 0 means no keep-alive in both
    "worker_connections": lambda v: v or None,
    # The arbiter SIGKILLs graceful_timeout after its TERM: stop draining a little earlier so
    # that lifespan shutdown still runs.
    "graceful_timeout": lambda v: max(v - 1.0, v * 0.8),
    "limit_request_line": lambda v: v if v > 0 else 1 << 20,  # Gunicorn's "unlimited" is 1 MiB
    "limit_request_fields": lambda v: v if 0 < v <= 32768 else 32768,
    "limit_request_field_size": lambda v: v if v > 0 else 8190,
    "proxy_protocol": lambda v: v not in (False, None, "off"),  # v1, v2, auto: both accepted
    "cert_reqs": int,
    # Gunicorn's default of 1 thread suits its sync worker; here it would serialise every WSGI
    # request of the worker, so only an explicit --threads above 1 replaces our default.
    "threads": lambda v: v if v > 1 else BY_NAME["wsgi_threads"].default,
    "loglevel": lambda v: v.lower() if v.lower() in BY_NAME["log_level"].choices else "info",
}


def settings_from_gunicorn(cfg: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """uvworker settings for a Gunicorn config: every table row with a ``gunicorn`` slot takes
    Gunicorn's value, unless Gunicorn has it at its default and ``UVWORKER_<NAME>`` is set.

    Raises ConfigError naming the Gunicorn setting or variable for a value that does not fit.
    """
    try:
        chosen = from_environ(environ)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    chosen.pop("app", None)  # the application is Gunicorn's to name
    for setting in SETTINGS:
        source = cfg.settings.get(setting.gunicorn) if setting.gunicorn else None
        if source is None or (setting.name in chosen and _at_default(source)):
            continue
        value = source.get()
        if value is None:
            continue
        try:
            adapt = _ADAPT.get(setting.gunicorn)
            chosen[setting.name] = setting.coerce(adapt(value) if adapt else value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"Gunicorn setting {setting.gunicorn}={value!r} cannot be used: {err}"
            ) from None
    return chosen


def _at_default(source: Any) -> bool:
    try:
        return bool(source.get() == source.validator(source.default))
    except Exception:  # a validator with side effects or needs we do not meet
        return False


class Worker(GunicornWorker):
    """uvworker under Gunicorn: httptools and uvloop when installed, else h11 and asyncio."""

    # uvworker settings forced by this worker class, over Gunicorn's and the environment's.
    uvworker_settings: ClassVar[dict[str, Any]] = {}

    server: Server | None = None
    config: Config | None = None
    _access_format: AccessLog | None = None  # set when Gunicorn's own logger class is in use
    _log_access_enabled = False

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Run by the arbiter before it forks: stop Gunicorn at once on settings we cannot use."""
        try:
            config = Config(None, **(settings_from_gunicorn(cfg, os.environ) | cls.uvworker_settings))
            AccessLog(cfg.access_log_format)
        except (ConfigError, ValueError, TypeError) as err:
            raise RuntimeError(f"uvworker: {err}") from None
        warm_imports(config)  # in the arbiter, before workers fork and switch user
        if "h2" in (getattr(cfg, "http_protocols", None) or ()):
            raise RuntimeError("uvworker speaks HTTP/1.1: remove h2 from http_protocols.")
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
            config, on_ready=self._on_ready, on_tick=self._on_tick, install_signal_handlers=False
        )
        with asyncio.Runner(loop_factory=config.loop_factory) as runner:
            runner.run(self._serve(server))
        if server.startup_failed:  # the app's lifespan startup failed: stop Gunicorn, not loop
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def _load_config(self) -> Config:
        cfg = self.cfg
        settings = settings_from_gunicorn(cfg, os.environ) | self.uvworker_settings
        proxy_headers = settings.get("proxy_headers", BY_NAME["proxy_headers"].default)
        # Requests are logged through Gunicorn's logger (below), and proxy headers are applied
        # in front of the app, where secure_scheme_headers are too.
        config = Config(self.wsgi, **(settings | {"access_log": False, "proxy_headers": False}))
        config.load()
        if cfg.is_ssl:
            config.ssl_context = gunicorn_ssl_context(cfg)  # honours the ssl_context hook
        self._setup_logging(config)
        config.loaded_app = self._front(config, proxy_headers)
        self.config = config
        return config

    def _setup_logging(self, config: Config) -> None:
        error_logger = logging.getLogger("uvworker.error")
        if not error_logger.handlers:  # unless the user's logconfig already routes it
            error_logger.addHandler(_Forward(self.log.error_log))
            error_logger.propagate = False
        error_logger.setLevel(config.log_level.upper())
        self._access_format = None
        enabled = getattr(self.log, "access_log_enabled", None)
        if enabled is None:  # Gunicorn before 25
            cfg = self.cfg
            enabled = bool(cfg.accesslog or cfg.logconfig or cfg.logconfig_dict or cfg.syslog)
        self._log_access_enabled = bool(enabled)
        logger_class = type(self.log)
        if logger_class.access is glogging.Logger.access and logger_class.atoms is glogging.Logger.atoms:
            # Gunicorn's own logger: render the line ourselves (its format, parsed once).
            self._access_format = AccessLog(self.cfg.access_log_format)

    # -- in front of the application ---------------------------------------------------------
    def _front(self, config: Config, proxy_headers: bool) -> Any:
        """The app, behind Gunicorn's per-request rules (only those that are on)."""
        app = config.loaded_app
        trusted: TrustedHosts = config.forwarded_allow
        secure = {
            name.lower().encode("latin-1"): value.encode("latin-1")
            for name, value in (self.cfg.secure_scheme_headers or {}).items()
        }
        budget = self.max_requests < sys.maxsize
        # Gunicorn's default pre_request only logs at debug level: skip it unless it would.
        debug = getattr(self.log, "loglevel", logging.INFO) <= logging.DEBUG
        pre_request = self.cfg.pre_request if _hook_set(self.cfg, "pre_request") or debug else None
        if not (proxy_headers or secure or budget or pre_request):
            return app

        async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                return await app(scope, receive, send)
            client = scope.get("client")
            if (proxy_headers or secure) and (client[0] if client else None) in trusted:
                scheme = _secure_scheme(scope["headers"], secure) if secure else None
                if proxy_headers:
                    apply_proxy_headers(scope, trusted)
                if scheme is _CONTRADICTION:
                    return await _reject(scope, send, "Contradictory scheme headers")
                if scheme is not None:
                    scope["scheme"] = scheme if scope["type"] == "http" else _WS_SCHEMES[scheme]
            if budget:
                self.nr += 1
                if self.nr == self.max_requests:
                    self.log.info("Autorestarting worker after current request.")
                    assert self.server is not None
                    self.server.retire()  # at once: the listeners close, this response says close
            if pre_request is not None:
                pre_request(self, GunicornRequest(scope))
            await app(scope, receive, send)

        return front

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
        self.notify()
        await server.serve(sockets=[getattr(sock, "sock", sock) for sock in self.sockets])

    def _on_ready(self) -> None:
        # Registered as the listeners start: no request can finish in the same loop turn.
        assert self.server is not None and self.server.state is not None
        hooks = self.server.state.request_hooks
        if self._log_access_enabled:
            hooks.append(self._log_access)
        if _hook_set(self.cfg, "post_request"):
            hooks.append(self._post_request)

    def _on_tick(self, server: Server) -> None:
        self.notify()
        if server.should_exit:
            return
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            server.retire()
        elif not self.alive:  # the reloader saw a change
            server.retire()

    def _on_term(self) -> None:
        self.alive = False
        if self.server is not None:
            self.server.retire()  # graceful, even when a max_requests retirement is under way

    def _on_quit(self) -> None:
        if self.server is None or self.server.force_exit:
            return
        self.alive = False
        self.cfg.worker_int(self)
        self.server.handle_signal(signal.SIGQUIT)  # quick: lifespan shutdown still runs

    def handle_abort(self, sig: int, frame: Any) -> None:
        """SIGABRT from the arbiter (heartbeat timeout): runs outside the event loop."""
        self.alive = False
        # The innermost frames: where the app was stuck, not how Gunicorn got there.
        where = "".join(traceback.format_stack(frame, limit=12)) if frame is not None else "(unknown)\n"
        self.log.critical("Worker aborted (pid: %s); the main thread was here:\n%s", self.pid, where.rstrip())
        self.cfg.worker_abort(self)
        sys.exit(1)

    def _log_access(self, cycle: RequestCycle) -> None:
        duration = time.perf_counter() - cycle.start_clock
        try:
            if self._access_format is not None:
                access_log = self.log.access_log
                if access_log.isEnabledFor(logging.INFO):
                    access_log.info(
                        self._access_format.render(
                            cycle.scope, cycle.status, cycle.response_headers, cycle.bytes_sent,
                            cycle.start_time, duration,
                        )
                    )
            else:  # a custom logger_class (statsd, ...): give it Gunicorn's own objects
                request, response = GunicornRequest(cycle.scope), GunicornResponse(cycle)
                environ = wsgi_environ(cycle.scope)
                self.log.access(response, request, environ, datetime.timedelta(seconds=duration))
        except Exception:
            self.log.exception("Cannot write the access log line.")

    def _post_request(self, cycle: RequestCycle) -> None:
        try:
            request, environ = GunicornRequest(cycle.scope), wsgi_environ(cycle.scope)
            self.cfg.post_request(self, request, environ, GunicornResponse(cycle))
        except Exception:
            self.log.exception("Exception in post_request hook")


class H11Worker(Worker):
    """Pure Python: the h11 parser on the asyncio event loop."""

    uvworker_settings = {"http": "h11", "loop": "asyncio"}


def _hook_set(cfg: Any, name: str) -> bool:
    """True when the Gunicorn server hook ``name`` is the user's, not Gunicorn's default."""
    setting = cfg.settings[name]
    return setting.get() is not setting.default


class _Forward(logging.Handler):
    """Hands records to another logger's handlers (Gunicorn's error log)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


# -- Gunicorn's secure_scheme_headers ---------------------------------------------------------
_CONTRADICTION = "contradiction"
_WS_SCHEMES = {"https": "wss", "http": "ws"}


def _secure_scheme(headers: list[tuple[bytes, bytes]], secure: dict[bytes, bytes]) -> str | None:
    """"https" or "http" as the secure-scheme headers present say; None when none is present;
    _CONTRADICTION when they disagree (Gunicorn answers 400)."""
    scheme = None
    for name, value in headers:
        expected = secure.get(name)
        if expected is not None:
            this = "https" if value.strip() == expected else "http"
            if scheme is not None and this != scheme:
                return _CONTRADICTION
            scheme = this
    return scheme


async def _reject(scope: dict[str, Any], send: Any, reason: str) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = reason.encode()
    await send({"type": "http.response.start", "status": 400, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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


# -- what Gunicorn's hooks and custom loggers expect ----------------------------------------
class GunicornRequest:
    """The parts of Gunicorn's ``Request`` that hooks read, from an ASGI scope."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.method: str = scope.get("method", "GET")
        self.path: str = scope.get("raw_path", b"").decode("latin-1") or scope.get("path", "/")
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.uri = f"{self.path}?{self.query}" if self.query else self.path
        self.fragment = ""
        major, _, minor = scope.get("http_version", "1.1").partition(".")
        self.version = (int(major), int(minor or 0))
        self.headers = [(k.decode("latin-1").upper(), v.decode("latin-1")) for k, v in scope["headers"]]
        self.scheme: str = scope.get("scheme", "http")
        self.remote_addr = self.peer_addr = scope.get("client")


class GunicornResponse:
    """The parts of Gunicorn's ``Response`` that post_request and loggers read."""

    def __init__(self, cycle: RequestCycle) -> None:
        try:
            phrase = HTTPStatus(cycle.status).phrase
        except ValueError:
            phrase = ""
        self.status_code = cycle.status
        self.status = f"{cycle.status} {phrase}".rstrip()
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in cycle.response_headers]
        self.sent = cycle.bytes_sent
        length = next((v for k, v in self.headers if k.lower() == "content-length"), None)
        self.response_length = int(length) if length and length.isdigit() else None


def wsgi_environ(scope: dict[str, Any]) -> dict[str, Any]:
    """A WSGI-style environ for an ASGI request (for hooks and loggers written for Gunicorn);
    the scope itself is under "asgi.scope"."""
    request = GunicornRequest(scope)
    client, server = scope.get("client"), scope.get("server")
    root_path = scope.get("root_path", "")
    path = scope.get("path", "/")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": root_path,
        "PATH_INFO": path[len(root_path):] if root_path and path.startswith(root_path) else path,
        "QUERY_STRING": request.query,
        "RAW_URI": request.uri,
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": client[0] if client else "",
        "REMOTE_PORT": str(client[1]) if client else "",
        "SERVER_NAME": server[0] if server else "",
        "SERVER_PORT": str(server[1]) if server and server[1] is not None else "",
        "wsgi.url_scheme": request.scheme,
        "asgi.scope": scope,
    }
    for name, value in request.headers:
        key = name.replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ
