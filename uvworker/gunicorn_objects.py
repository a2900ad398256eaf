"""Gunicorn's request, response and environ, as its hooks and logger classes read them.

Code written for Gunicorn (``pre_request(worker, req)``, ``post_request(worker, req, environ,
resp)``, a ``logger_class`` whose ``access(resp, req, environ, request_time)`` feeds statsd or
a custom log) expects Gunicorn's own objects. These are made from what uvworker has instead:
an ASGI scope, and a finished request as the server's request hooks receive it. Only the
attributes such code reads are provided; they are built per request, and only when a hook or
logger class that needs them is configured.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

from uvworker import __version__
from uvworker.interfaces.wsgi import build_environ

__all__ = ["FinishedRequest", "GunicornRequest", "GunicornResponse", "gunicorn_request", "wsgi_environ"]


class FinishedRequest(Protocol):
    """What the server's request hooks receive when a request is done."""

    scope: dict[str, Any]
    status: int
    response_headers: list[tuple[bytes, bytes]]
    bytes_sent: int
    start_time: float  # time.time() when the request began
    start_clock: float  # time.perf_counter() then


class GunicornRequest:
    """The parts of Gunicorn's ``Request`` that hooks read, from an ASGI scope."""

    def __init__(self, scope: dict[str, Any]) -> None:
        # Not the scope itself: the scope holds this object (gunicorn_request), a reference cycle.
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


def gunicorn_request(scope: dict[str, Any]) -> GunicornRequest:
    """The request's one ``GunicornRequest``, kept in its scope: Gunicorn gives pre_request,
    post_request and the logger class the same object, so what a hook sets on it (a start
    time, a trace id) the next one reads."""
    request = scope.get(_REQUEST_KEY)
    if request is None:
        request = scope[_REQUEST_KEY] = GunicornRequest(scope)
    return request


_REQUEST_KEY = "uvworker.gunicorn_request"


class GunicornResponse:
    """The parts of Gunicorn's ``Response`` that post_request and loggers read."""

    def __init__(self, done: FinishedRequest) -> None:
        try:
            phrase = HTTPStatus(done.status).phrase
        except ValueError:
            phrase = ""
        self.status_code = done.status
        self.status = f"{done.status} {phrase}".rstrip()
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in done.response_headers]
        self.sent = done.bytes_sent
        length = next((v for k, v in self.headers if k.lower() == "content-length"), None)
        self.response_length = int(length) if length and length.isdigit() else None


def wsgi_environ(scope: dict[str, Any]) -> dict[str, Any]:
    """The environ Gunicorn's hooks and logger classes get for an ASGI request: the one a WSGI
    app gets (``build_environ``: same keys, and the same header rules — names with "_"
    dropped, repeated fields joined with ",", cookies with "; "), plus Gunicorn's RAW_URI and
    the scope itself under "asgi.scope"."""
    environ, _ = build_environ(scope, _BASE_ENVIRON)
    query = scope.get("query_string", b"")
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    environ["RAW_URI"] = (path + b"?" + query if query else path).decode("latin-1")
    environ["asgi.scope"] = scope
    return environ


_BASE_ENVIRON: dict[str, Any] = {"SERVER_SOFTWARE": f"uvworker/{__version__}", "wsgi.version": (1, 0)}
