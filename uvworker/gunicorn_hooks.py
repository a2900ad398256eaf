"""Gunicorn's per-request machinery around the app, for the Gunicorn worker classes.

    when                    what runs                            made by
    ----------------------  -----------------------------------  ------------------------------
    before the app          forwarded_allow_ips (uvworker's      ``front()``: wraps the app
                            proxy headers), secure_scheme_       (only with the rules that are
                            headers, the worker's ``before``     on; else the app itself)
                            callback (request budget), the
                            pre_request hook
    the request is done     the access log, post_request         ``request_hooks()``: server
                                                                 request hooks
    the server logs         "uvworker.error" records go to       ``route_error_log()``
                            Gunicorn's error log

Rules kept: proxy and secure-scheme headers are read only from peers in forwarded_allow_ips,
in front of the app, where the peer address is still the socket's; secure-scheme headers
that contradict each other get a 400, as in Gunicorn. Gunicorn's SCRIPT_NAME (environment, or
a trusted proxy's header) is the app's mount point: the scope's root_path. Gunicorn's own
``Logger`` gets its access line from ``uvworker.logging.AccessLog`` (its format parsed once: no
Gunicorn objects per request); any other ``logger_class`` gets Gunicorn's objects
(uvworker.gunicorn_objects).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from contextvars import Context, copy_context
from typing import Any

from gunicorn import glogging

from uvworker.gunicorn_objects import PEER_KEY, FinishedRequest, gunicorn_response, wsgi_environ
from uvworker.logging import AccessLog
from uvworker.proxy import TrustedHosts, apply_proxy_headers

__all__ = ["access_log", "front", "hook_set", "needs_app_environ", "request_hooks", "route_error_log"]

Hook = Callable[[FinishedRequest], None]


def hook_set(cfg: Any, name: str) -> bool:
    """True when the Gunicorn server hook ``name`` is the user's, not Gunicorn's default."""
    setting = cfg.settings[name]
    return setting.get() is not setting.default


# -- before the app -----------------------------------------------------------------------------
def front(
    app: Any,
    *,
    trusted: TrustedHosts,
    proxy_headers: bool,
    secure_scheme_headers: dict[str, str] | None,
    before: Callable[[dict[str, Any], Any], None] | None,
    script_name: str = "",
    script_name_header: bool = False,
    root_path: str = "",
) -> Any:
    """The app behind Gunicorn's per-request rules (only those that are on). ``before(scope,
    cycle)`` runs last, just before the app (``cycle``: the request's, which ``receive`` is
    bound to, or None). ``script_name``: Gunicorn's SCRIPT_NAME from the environment, the
    app's mount point; with ``script_name_header`` (SCRIPT_NAME in forwarder_headers) a
    trusted proxy's SCRIPT_NAME header gives it instead. The request path must start with
    it (else a 500, as in Gunicorn); it becomes the scope's root_path (WSGI: SCRIPT_NAME, and
    PATH_INFO the rest of the path). Without one, Gunicorn's ``root_path`` setting is the
    root_path, the path left as it came (as Gunicorn's ASGI worker does), and unchecked."""
    secure = {
        name.lower().encode("latin-1"): value.encode("latin-1")
        for name, value in (secure_scheme_headers or {}).items()
    }
    if script_name_header:
        secure[_SCRIPT_NAME] = _SCRIPT_NAME  # read in the same pass as the scheme headers
    if not (proxy_headers or secure or before or script_name or root_path):
        return app
    default_mount = (script_name, True) if script_name else (root_path, False)  # (mount, checked)
    return _Front(app, trusted, proxy_headers, secure, before, default_mount)


class _Front:
    """The app behind the rules (see ``front``). An app served without an ASGI task
    (``serve_cycle``, the WSGI adapter over HTTP/1.1) keeps that path behind them: the rules
    and ``before`` run as the request arrives, and only a refusal takes a task."""

    def __init__(self, app: Any, trusted: TrustedHosts, proxy_headers: bool, secure: dict[bytes, bytes],
                 before: Callable[[dict[str, Any], Any], None] | None, default_mount: tuple[str, bool]) -> None:
        self.app = app
        self.trusted = trusted
        self.proxy_headers = proxy_headers
        self.secure = secure
        self.before = before
        self.default_mount = default_mount
        direct = getattr(app, "serve_cycle", None)
        if direct is not None:
            self.direct = direct
            self.serve_cycle = self._serve_cycle  # ServerState.direct: only when the app has one

    def _rules(self, scope: dict[str, Any]) -> tuple[str, int] | None:
        """Apply the rules to ``scope``; a refusal's (reason, status), or None."""
        client = scope.get("client")
        mount, strict = self.default_mount
        proxy_headers, secure = self.proxy_headers, self.secure
        if (proxy_headers or secure) and (client[0] if client else None) in self.trusted:
            scheme, forwarded_mount = _trusted_fields(scope["headers"], secure) if secure else (None, None)
            if proxy_headers:
                scope[PEER_KEY] = client  # Gunicorn's req.peer_addr and remote_addr stay the peer
                apply_proxy_headers(scope, self.trusted)
            if scheme is _CONTRADICTION:
                return "Contradictory scheme headers", 400
            if scheme is not None:
                scope["scheme"] = scheme if scope["type"] == "http" else _WS_SCHEMES[scheme]
            if forwarded_mount is not None:
                mount, strict = forwarded_mount, True
        if mount:
            if strict and not (scope.get("raw_path") or scope["path"].encode()).startswith(mount.encode("latin-1")):
                return f"Request path {scope['path']!r} does not start with SCRIPT_NAME {mount!r}", 500
            scope["root_path"] = mount
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        refusal = self._rules(scope)
        if refusal is not None:
            return await _reject(scope, send, *refusal)
        if self.before is not None:
            self.before(scope, getattr(receive, "__self__", None))
        await self.app(scope, receive, send)

    def _serve_cycle(self, cycle: Any) -> None:
        scope = cycle.scope
        refusal: tuple[str, int] | BaseException | None = self._rules(scope)
        if refusal is None and self.before is not None:
            # In a context of its own, as in the request's task (a hook's contextvars stay its own).
            context = Context() if cycle.stream.config.reset_contextvars else copy_context()
            try:
                context.run(self.before, scope, cycle)
            except BaseException as exc:  # in the request's task, as the app's error would be
                refusal = exc
        if refusal is None:
            self.direct(cycle)
            return
        cycle.task = cycle.stream.loop.create_task(cycle.run_asgi(_Refused(refusal)))


class _Refused:
    """An ASGI app that sends a rule's refusal, or raises the error ``before`` raised."""

    def __init__(self, refusal: tuple[str, int] | BaseException) -> None:
        self.refusal = refusal

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        refusal, self.refusal = self.refusal, None  # type: ignore[assignment]  # no cycle via an error's traceback
        if isinstance(refusal, BaseException):
            try:
                raise refusal
            finally:
                refusal = None  # type: ignore[assignment]
        await _reject(scope, send, *refusal)


_CONTRADICTION = "contradiction"
_WS_SCHEMES = {"https": "wss", "http": "ws"}
_SCRIPT_NAME = b"script_name"


def _trusted_fields(headers: list[tuple[bytes, bytes]], secure: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """From a trusted peer's headers, in one pass: "https" or "http" as the secure-scheme
    headers present say (None when none is present; _CONTRADICTION when they disagree:
    Gunicorn answers 400), and the SCRIPT_NAME header's value (when ``secure`` lists it)."""
    scheme = mount = None
    for name, value in headers:
        expected = secure.get(name)
        if expected is not None:
            if expected is _SCRIPT_NAME:
                mount = value.decode("latin-1").strip()
                continue
            this = "https" if value.strip() == expected else "http"
            if scheme is not None and this != scheme:
                return _CONTRADICTION, mount
            scheme = this
    return scheme, mount


async def _reject(scope: dict[str, Any], send: Any, reason: str, status: int = 400) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = reason.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# -- after the request --------------------------------------------------------------------------
def request_hooks(worker: Any) -> list[Hook]:
    """The server request hooks that give Gunicorn's logger and post_request hook each finished
    request (``worker`` is the Gunicorn worker: its ``log`` and ``cfg``)."""
    log, cfg = worker.log, worker.cfg
    hooks: list[Hook] = []
    if _own_access(log):
        # Gunicorn's workers call access() for every request, access log or not: a logger
        # class may do more there (Gunicorn's statsd logger counts and times requests).
        hooks.append(_call_access(log, cfg))
    elif _access_log_enabled(log, cfg):
        hooks.append(_render_access(log, access_log(cfg)))
    if hook_set(cfg, "post_request"):
        hooks.append(_call_post_request(worker))
    return hooks


def access_log(cfg: Any) -> AccessLog:
    """Gunicorn's access_log_format, rendered as Gunicorn renders it: '{name}e' atoms read the
    request's WSGI environ (raises ValueError for a format that cannot be rendered)."""
    return AccessLog(cfg.access_log_format, environ=wsgi_environ)


def needs_app_environ(worker: Any) -> bool:
    """Whether the request hooks read the environ (so a WSGI app's should be kept for them)."""
    log, cfg = worker.log, worker.cfg
    if _own_access(log):
        return True
    if _access_log_enabled(log, cfg) and access_log(cfg).environ is not None:
        return True
    return hook_set(cfg, "post_request")


def _own_access(log: Any) -> bool:
    """Whether Gunicorn's logger_class has an access() (or atoms) of its own to call."""
    logger_class = type(log)
    return logger_class.access is not glogging.Logger.access or logger_class.atoms is not glogging.Logger.atoms


def _access_log_enabled(log: Any, cfg: Any) -> bool:
    enabled = getattr(log, "access_log_enabled", None)
    if enabled is None:  # Gunicorn before 25
        enabled = bool(cfg.accesslog or cfg.logconfig or cfg.logconfig_dict or cfg.syslog)
    return bool(enabled)


def _render_access(log: Any, access_format: AccessLog) -> Hook:
    """Gunicorn's own logger: the line rendered here, in Gunicorn's format."""
    access_log = log.access_log

    def hook(done: FinishedRequest) -> None:
        try:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(access_format.render(
                    done.scope, done.status, done.response_headers, done.bytes_sent,
                    done.start_time, time.perf_counter() - done.start_clock,
                ))
        except Exception:
            log.exception("Cannot write the access log line.")

    return hook


def _call_access(log: Any, cfg: Any) -> Hook:
    """Another logger_class (statsd, ...): its access() with Gunicorn's own objects."""

    def hook(done: FinishedRequest) -> None:
        duration = datetime.timedelta(seconds=time.perf_counter() - done.start_clock)
        try:
            response = gunicorn_response(done, cfg)
            log.access(response, response.req, wsgi_environ(done.scope), duration)
        except Exception:
            log.exception("Cannot write the access log line.")

    return hook


def _call_post_request(worker: Any) -> Hook:
    def hook(done: FinishedRequest) -> None:
        try:
            response = gunicorn_response(done, worker.cfg)
            worker.cfg.post_request(worker, response.req, wsgi_environ(done.scope), response)
        except Exception:
            worker.log.exception("Exception in post_request hook")

    return hook


# -- the error log ------------------------------------------------------------------------------
def route_error_log(log: Any, level: str) -> None:
    """Send "uvworker.error" records to Gunicorn's error log, unless the user's logconfig
    already routes that logger. Gunicorn's own Logger gets each record as it is; another
    logger_class gets the calls Gunicorn's workers make (``log.warning(message)``, ...), so
    that what it does there happens too (Gunicorn's statsd logger counts gunicorn.log.*)."""
    error_logger = logging.getLogger("uvworker.error")
    if not error_logger.handlers:
        plain = type(log) is glogging.Logger
        error_logger.addHandler(_Forward(log.error_log) if plain else _CallLogger(log))
        error_logger.propagate = False
    error_logger.setLevel(level.upper())


class _Forward(logging.Handler):
    """Hands records to another logger's handlers (Gunicorn's error log)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _CallLogger(logging.Handler):
    """Hands records to a Gunicorn logger_class through its methods, one per level
    (``exception`` for an error with a traceback, as Gunicorn's workers log those)."""

    def __init__(self, log: Any) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno
        name = next(name for least, name in _METHODS if level >= least)
        if name == "error" and record.exc_info:
            name = "exception"
        try:
            getattr(self.log, name)(record.getMessage(), exc_info=record.exc_info)
        except Exception:
            self.handleError(record)


_METHODS = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"),
            (logging.INFO, "info"), (0, "debug"))
