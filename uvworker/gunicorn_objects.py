"""Gunicorn's request, response and environ, as its hooks and logger classes read them.

Code written for Gunicorn (``pre_request(worker, req)``, ``post_request(worker, req, environ,
resp)``, a ``logger_class`` whose ``access(resp, req, environ, request_time)`` feeds statsd or
a custom log) expects Gunicorn's own objects. These are made from what uvworker has instead:
an ASGI scope, and a finished request as the server's request hooks receive it. They are built
per request, and only when a hook or logger class that needs them is configured: nothing costs
without one.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from uvworker import __version__
from uvworker.interfaces.wsgi import ENVIRON_KEY, build_environ
from uvworker.proxy import PROXY_EXTENSION

__all__ = [
    "PEER_KEY", "FinishedRequest", "GunicornRequest", "GunicornResponse", "gunicorn_request",
    "gunicorn_response", "wsgi_environ",
]

logger = logging.getLogger("uvworker.error")


class FinishedRequest(Protocol):
    """What the server's request hooks receive when a request is done (a request cycle)."""

    scope: dict[str, Any]
    status: int
    response_headers: list[tuple[bytes, bytes]]
    bytes_sent: int
    start_time: float  # time.time() when the request began
    start_clock: float  # time.perf_counter() then
    response_started: bool
    streaming: bool  # a body piece with more to come went out


# Set in the scope by gunicorn_hooks.front when it rewrites the client from proxy headers: the
# peer the request came from, which Gunicorn's req.peer_addr and remote_addr stay.
PEER_KEY = "uvworker.peer"


class GunicornRequest:
    """Gunicorn's ``Request`` (gunicorn/http/message.py) as hooks read it, from an ASGI scope:
    the same names, with the values and types Gunicorn's own workers give (its gthread worker,
    compared in tests/test_gunicorn_objects.py), for ASGI and WSGI apps, HTTP/1.1 and HTTP/2.

    Two differ by necessity. ``body`` reads as empty: the body streams to the application, which
    alone reads it (under Gunicorn a hook reading it takes it from the app; here it would have
    to buffer all of it first); a read of a request that has a body logs a warning, once.
    ``trailers`` is empty: request trailers do not reach ASGI or WSGI applications either."""

    must_close = False
    fragment = ""

    def __init__(self, scope: dict[str, Any], owner: Any = None, cfg: Any = None) -> None:
        # Not the scope itself: the scope holds this object (gunicorn_request), a reference cycle.
        self.method: str = scope.get("method", "GET")
        self.path: str = scope.get("raw_path", b"").decode("latin-1") or scope.get("path", "/")
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self.uri = f"{self.path}?{self.query}" if self.query else self.path
        major, _, minor = scope.get("http_version", "1.1").partition(".")
        self.version = (int(major), int(minor or 0))
        headers = self.headers = [(k.decode("latin-1").upper(), v.decode("latin-1")) for k, v in scope["headers"]]
        if self.version[0] == 2:  # Gunicorn adds Host, from :authority, after the other fields
            headers.sort(key=lambda field: field[0] == "HOST")
        self.trailers: list[tuple[str, str]] = []
        self.body = HookBody(any(
            (name == "CONTENT-LENGTH" and value.strip() not in ("", "0")) or name == "TRANSFER-ENCODING"
            for name, value in headers
        ))
        self.scheme: str = _HTTP_SCHEMES.get(scope.get("scheme", "http"), "http")
        proxy = (scope.get("extensions") or {}).get(PROXY_EXTENSION)
        peer = proxy["peer"] if proxy else scope.get(PEER_KEY, scope.get("client"))
        self.peer_addr = self.remote_addr = peer if peer else ""  # a Unix socket's peer: ''
        self.proxy_protocol_info = proxy["info"] if proxy else None
        self.req_number = _request_number(owner)
        self.cfg = cfg
        (self.limit_request_line, self.limit_request_fields, self.limit_request_field_size,
         self.max_buffer_headers) = _limits(cfg)

    def force_close(self) -> None:
        """Close the connection after this response (from pre_request: it says Connection:
        close; an HTTP/2 connection stays open, as under Gunicorn)."""
        self.must_close = True

    def should_close(self) -> bool:
        """Gunicorn's answer: whether this request asks for the connection to close."""
        if self.must_close or self.method == "CONNECT":
            return True
        for name, value in self.headers:
            if name == "CONNECTION":
                value = value.lower().strip(" \t")
                if value == "close":
                    return True
                if value == "keep-alive":
                    return False
                break
        return self.version <= (1, 0)


def _limits(cfg: Any) -> tuple[int, int, int, int]:
    """Gunicorn's Request limits from its settings, clamped as it clamps them (Message and
    Request.__init__): limit_request_line (0: unlimited), limit_request_fields,
    limit_request_field_size, max_buffer_headers."""
    if cfg is None:
        return _DEFAULT_LIMITS
    line = cfg.limit_request_line
    line = _MAX_REQUEST_LINE if line < 0 or line >= _MAX_REQUEST_LINE else line
    fields = cfg.limit_request_fields
    fields = _MAX_HEADERS if fields <= 0 or fields > _MAX_HEADERS else fields
    field_size = cfg.limit_request_field_size
    field_size = _MAX_FIELD_SIZE if field_size <= 0 else field_size
    return line, fields, field_size, fields * (field_size + 2) + 4


_MAX_REQUEST_LINE, _MAX_HEADERS, _MAX_FIELD_SIZE = 8190, 32768, 8190  # gunicorn.http.message's
_DEFAULT_LIMITS = (4094, 100, 8190, 100 * (8190 + 2) + 4)  # from Gunicorn's default settings

_HTTP_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


class HookBody:
    """``req.body`` for hooks: file-like, always at its end (see GunicornRequest)."""

    warned = False  # once per process
    answered = False  # the response is out (gunicorn_response): a read takes nothing from the app

    def __init__(self, has_body: bool) -> None:
        self._has_body = has_body

    def read(self, size: int | None = None) -> bytes:
        self._notice()
        return b""

    def readline(self, size: int | None = None) -> bytes:
        self._notice()
        return b""

    def readlines(self, size: int | None = None) -> list[bytes]:
        self._notice()
        return []

    def __iter__(self) -> HookBody:
        return self

    def __next__(self) -> bytes:
        self._notice()
        raise StopIteration

    def _notice(self) -> None:
        """A read of a body before the response (pre_request): under Gunicorn it takes the body."""
        if self._has_body and not (self.answered or HookBody.warned):
            HookBody.warned = True
            logger.warning("A Gunicorn hook read req.body: it reads as empty under uvworker, where the request "
                           "body streams to the application, which alone can read it.")


_CONNECTIONS: WeakKeyDictionary[Any, int] = WeakKeyDictionary()  # requests seen per HTTP/1.1 connection


def _request_number(owner: Any) -> int:
    """Gunicorn's req_number: the request's number on its HTTP/1.1 connection, from 1; an
    HTTP/2 stream's id. ``owner`` is the request's cycle (its ``stream``: the HTTP/1.1
    connection, or the HTTP/2 stream); counted once per request, as its object is made."""
    stream = getattr(owner, "stream", None)
    if stream is None:
        return 1
    stream_id = getattr(stream, "id", None)
    if type(stream_id) is int:
        return stream_id
    number = _CONNECTIONS[stream] = _CONNECTIONS.get(stream, 0) + 1
    return number


def gunicorn_request(scope: dict[str, Any], owner: Any = None, cfg: Any = None) -> GunicornRequest:
    """The request's one ``GunicornRequest``, kept in its scope: Gunicorn gives pre_request,
    post_request and the logger class the same object, so what a hook sets on it (a start
    time, a trace id) the next one reads. ``owner``: the request's cycle; ``cfg``: Gunicorn's
    settings (``req.cfg``)."""
    request = scope.get(_REQUEST_KEY)
    if request is None:
        request = scope[_REQUEST_KEY] = GunicornRequest(scope, owner, cfg)
    return request


_REQUEST_KEY = "uvworker.gunicorn_request"


class GunicornResponse:
    """Gunicorn's ``Response`` (gunicorn/http/wsgi.py) as post_request and loggers read it,
    from a finished request: its values describe the response uvworker sent."""

    must_close = False
    version = "uvworker"  # Gunicorn's: its Server header

    def __init__(self, done: FinishedRequest, request: GunicornRequest) -> None:
        self.req = request
        status = self.status_code = done.status
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        self.status = f"{status} {phrase}".rstrip()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in done.response_headers]
        self.headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]  # as Gunicorn keeps them
        self.upgrade = status == 101
        self.sent = done.bytes_sent
        length = next((v.strip() for k, v in headers if k.lower() == "content-length"), None)
        self.response_length = int(length) if length and length.isdigit() else None
        self.headers_sent = bool(getattr(done, "response_started", True))
        no_body = request.method == "HEAD" or status < 200 or status in (204, 304)
        # A body streamed without a length goes chunked to an HTTP/1.1 client; one piece gets
        # a Content-Length (where Gunicorn would chunk); HTTP/2 frames its own.
        self._unframed = self.response_length is None and not no_body and bool(getattr(done, "streaming", False))
        self.chunked = self._unframed and request.version == (1, 1)

    def should_close(self) -> bool:
        """Whether the connection closes after this response, by the request and the framing
        (the end of a body sent to an HTTP/1.0 client without a length is the close)."""
        return self.must_close or self.req.should_close() or (self._unframed and self.req.version < (1, 1))


_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade"))


def gunicorn_response(done: FinishedRequest, cfg: Any = None) -> GunicornResponse:
    """The finished request's ``GunicornResponse``, made once for the logger and post_request."""
    response = done.scope.get(_RESPONSE_KEY)
    if response is None:
        request = gunicorn_request(done.scope, done, cfg)
        request.body.answered = True
        response = done.scope[_RESPONSE_KEY] = GunicornResponse(done, request)
    return response


_RESPONSE_KEY = "uvworker.gunicorn_response"


def wsgi_environ(scope: dict[str, Any]) -> dict[str, Any]:
    """The environ Gunicorn's hooks, logger classes and '{name}e' access-log atoms get: a
    WSGI app's own (kept by its adapter, with the keys the app set, as under Gunicorn), else
    the one a WSGI app would get (``build_environ``: same keys, and the same header rules —
    names with "_" dropped, repeated fields joined with ",", cookies with "; ") and the scope
    itself under "asgi.scope"; with Gunicorn's RAW_URI."""
    environ = scope.get(ENVIRON_KEY)
    if environ is None:
        environ, _ = build_environ(scope, _BASE_ENVIRON)
        environ["asgi.scope"] = scope
    if "RAW_URI" not in environ:
        query = scope.get("query_string", b"")
        path = scope.get("raw_path") or scope["path"].encode("utf-8")
        environ["RAW_URI"] = (path + b"?" + query if query else path).decode("latin-1")
    return environ


_BASE_ENVIRON: dict[str, Any] = {"SERVER_SOFTWARE": f"uvworker/{__version__}", "wsgi.version": (1, 0)}
