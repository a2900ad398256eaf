"""How the server closes a connection, as a client sees it (RFC 9112 §9.6), and what is left
of it in the server afterwards.

Closing a socket that still has unread input makes the kernel send a reset, and a reset can
destroy the server's last response (a 400, a 431) before the client has read it. uvworker
closes gracefully: its FIN first, then it reads and drops what the client still sends, until
the client's FIN (or a short, bounded linger).

A closed connection is freed by reference counting, at once: none of its objects is left in
a reference cycle for the cyclic collector (with a new connection per request, collecting
them was a fifth of the server's CPU time).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.freed import assert_freed, collector_off, open_connection_objects
from tests.http_client import Conn, build_request, capture_log
from uvworker.protocols.http import LINGER_TIME


async def never_called(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError("never called")


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_an_error_answer_survives_the_rest_of_a_large_bad_request(serve: Any) -> None:
    junk = b"X-Junk: " + b"j" * 1000 + b"\r\n"
    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + junk * 300  # far beyond the header limits
    with serve(never_called) as srv:
        for _ in range(10):
            with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
                try:
                    sock.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_the_answer_to_a_bad_request_survives_pipelined_bytes_behind_it(serve: Any) -> None:
    with serve(never_called) as srv:
        for _ in range(10):
            with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + build_request() * 200)  # no Host: 400
                assert read_all(sock).startswith(b"HTTP/1.1 400 ")


def test_a_client_that_said_close_and_pipelined_more_still_reads_its_answer(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    pipelined = build_request() * (512 * 1024 // len(build_request()))  # more than a read
    with serve(app) as srv:
        for _ in range(10):
            with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
                # Requests after a close are not to be sent (RFC 9112 §9.6). Those the server
                # holds, and those it has not read yet, make it linger rather than reset our
                # answer (a reset with input unread).
                sock.sendall(build_request(headers=[("Connection", "close")]) + pipelined)
                answer = read_all(sock)
                assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("request_", [
    build_request(headers=[("Connection", "close")]),
    build_request("POST", headers=[("Connection", "close")], body=b"x" * 1000),
    build_request(version="1.0"),
], ids=["close", "close with a body", "HTTP/1.0"])
def test_a_client_whose_last_request_is_read_whole_is_not_waited_for(serve: Any, request_: bytes) -> None:
    """Nothing more is due from it: the server closes at once instead of lingering for its
    FIN, while the client, silent, keeps its socket open."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        registry = srv.server.state.connections  # type: ignore[union-attr]
        wait_for(lambda: registry)
        conn.send(request_)
        assert conn.read_response().body == b"ok"
        assert conn.read_until_close() == b""
        wait_for(lambda: not registry, timeout=LINGER_TIME / 2)


def test_after_our_fin_the_client_may_still_send_and_then_close(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"bye"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.body == b"bye" and resp.has_token("connection", "close")
        assert conn.read_until_close() == b""  # our FIN ...
        conn.send(build_request())  # ... the client's late bytes are dropped, not answered
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.sock.recv(100) == b""


@pytest.mark.parametrize("ending", ["client says close", "app says close", "client leaves", "client leaves mid-body"])
def test_a_closed_connection_is_freed_at_once(serve: Any, ending: str) -> None:
    reading = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] == "POST":  # reads a body the client never finishes
            while (await receive())["type"] != "http.disconnect":
                reading.set()
            return
        headers = [(b"connection", b"close")] if scope["path"] == "/close" else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, collector_off():
        with Conn.open(srv.host, srv.port) as conn:
            objects = open_connection_objects(srv)
            if ending == "client says close":
                conn.send(build_request(headers=[("Connection", "close")]))
            elif ending == "app says close":
                conn.send(build_request(target="/close"))
            elif ending == "client leaves":
                conn.send(build_request())
            else:
                conn.send(build_request("POST", headers=[("Content-Length", "100")]) + b"x" * 10)
                assert reading.wait(5)
            if ending != "client leaves mid-body":
                assert conn.read_response().body == b"ok"
            if "close" in ending:
                assert conn.read_until_close() == b""
        assert_freed(objects)


def test_a_client_that_half_closes_after_its_request_gets_the_answer(serve: Any) -> None:
    """A client may shut down its sending side once its request is out and read the answer
    (RFC 9112 §9.6; Gunicorn and Hypercorn answer it, uvicorn drops it). The app's receive()
    says http.disconnect, as for a client that has gone (a FIN may mean either), but what the
    app sends still goes out, with Connection: close, and the connection is closed and freed
    at once after it. An app that gives up on seeing the disconnect is no error: the
    connection closes without an answer. Before, the FIN closed the connection: a slow app's
    answer was lost (its send() raised ClientDisconnected). A WSGI app, which sees no
    disconnect, is answered too; a FIN in the middle of a body still ends the request."""
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message["body"]
        seen.append(message["type"])  # waits for the FIN: the disconnect comes after the body
        if scope["path"] == "/give-up":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"got " + body})

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        wait_for(lambda: registry and all(c.core.last_request for c in registry))  # the FIN is in
        start_response("200 OK", [])
        return [b"wsgi got " + body]

    def half_closed(srv: Any, request_: bytes, reply: bytes) -> None:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(request_)
            conn.sock.shutdown(socket.SHUT_WR)
            data = read_all(conn.sock)
            assert data.endswith(reply) and (b"\r\nconnection: close\r\n" in data.lower()) == bool(reply), data
        wait_for(lambda: not registry, timeout=LINGER_TIME / 2)  # closed at once, not after a linger

    with capture_log() as errors, serve(app) as srv:
        registry = srv.server.state.connections  # type: ignore[union-attr]
        half_closed(srv, build_request(), b"\r\n\r\ngot ")
        post = build_request("POST", headers=[("Content-Length", "5")], body=b"hello")
        half_closed(srv, post, b"\r\n\r\ngot hello")
        half_closed(srv, build_request(target="/give-up"), b"")
        half_closed(srv, post[:-2], b"")  # the body cut short: nothing to answer
        wait_for(lambda: seen == ["http.disconnect"] * 4)
    assert not errors, [r.getMessage() for r in errors]
    with serve(wsgi_app) as srv:
        registry = srv.server.state.connections  # type: ignore[union-attr]
        half_closed(srv, post, b"\r\n\r\nwsgi got hello")
