"""Whatever kind of connection it was and however it ended, nothing of it is left for the
cyclic collector: its objects go by reference counting, as soon as the transport and the
app let go (``tests/freed.py``; HTTP/1.1's own endings are in ``test_http_close.py``).

Each test runs with the collector off, takes weak references to the server's objects while
they live (the connection, its core and parser, a WebSocket session and its protocol
object, an HTTP/2 connection and its h2 state, streams and request cycles, the app's task),
ends the connection, and waits for all of them to be gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.freed import assert_freed, collector_off, open_connection_objects, weak
from tests.h2_client import H2Client, get
from tests.http_client import Conn, build_request
from tests.test_tls import make_cert
from tests.test_websocket import RawWS, frame, handshake
from uvworker.gunicorn_objects import gunicorn_request, gunicorn_response, wsgi_environ
from uvworker.interfaces.wsgi import WSGIAdapter

Scope = dict[str, Any]


def _only(items: Any) -> Any:
    items = list(items)
    assert len(items) == 1, items
    return items[0]


# -- WebSocket -------------------------------------------------------------------------------
sessions: list[Any] = []  # weak references to each session and its protocol object


async def ws_app(scope: Scope, receive: Any, send: Any) -> None:
    path = scope["path"]
    sessions.extend(weak(receive.__self__, receive.__self__.protocol))
    assert (await receive())["type"] == "websocket.connect"
    if path == "/reject":
        await send({"type": "websocket.close"})
        return
    if path == "/deny":
        await send({"type": "websocket.http.response.start", "status": 404, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no"})
        return
    await send({"type": "websocket.accept"})
    if path == "/close":
        await send({"type": "websocket.close", "code": 4000})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if path != "/close":
            await send({"type": "websocket.send", "text": message["text"]})


WS_ENDINGS = [
    "client closes", "app closes", "ping timeout", "client vanishes", "app rejects", "app denies", "server refuses",
]


@pytest.mark.parametrize("ending", WS_ENDINGS)
def test_a_websocket_connection_is_freed_at_once(serve: Any, ending: str) -> None:
    settings = {"ws_ping_interval": 0.2, "ws_ping_timeout": 0.2} if ending == "ping timeout" else {}
    path = {"app closes": "/close", "app rejects": "/reject", "app denies": "/deny"}.get(ending, "/")
    sessions.clear()
    with serve(ws_app, **settings) as srv, collector_off():
        registry = srv.server.state.connections  # type: ignore[union-attr]
        with RawWS(srv) as ws:
            objects = open_connection_objects(srv)  # the HTTP/1.1 connection of the handshake
            ws.send(handshake(path, version="12" if ending == "server refuses" else "13"))
            status, _, _ = ws.read_head()
            if status != 101:
                assert status == {"app rejects": 403, "app denies": 404, "server refuses": 426}[ending]
                assert ws.at_eof()
            else:
                assert status == 101
                session = wait_for(lambda: next((c for c in registry if c.websocket), None))
                objects += weak(session.task)
                del session
                if ending != "app closes":
                    ws.send(frame(1, b"hi"))
                    assert ws.read_frame() == (1, b"hi")
                if ending == "client closes":
                    ws.send(frame(8, struct.pack("!H", 1000)))
                    assert ws.read_close()[0] == 1000
                elif ending == "app closes":
                    assert ws.read_close()[0] == 4000
                    ws.send(frame(8, struct.pack("!H", 4000)))
                elif ending == "ping timeout":
                    assert ws.read_frame()[0] == 9  # a ping, never answered
                    assert ws.read_close()[0] == 1011
                if ending == "client vanishes":  # a reset, without a close frame or a FIN
                    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    assert ws.at_eof()
        wait_for(lambda: not registry)
        assert_freed(objects + sessions)


# -- HTTP/2 ----------------------------------------------------------------------------------------
streams: list[Any] = []  # weak references to each request's cycle and its HTTP/2 stream


async def h2_app(scope: Scope, receive: Any, send: Any) -> None:
    cycle = receive.__self__
    streams.extend(weak(cycle, cycle.stream, cycle.task))
    del cycle
    if scope["path"] == "/wait":  # until the client resets the stream or leaves
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


H2_ENDINGS = ["client closes", "client's GOAWAY", "client resets a stream", "lost mid-stream", "over TLS"]


@pytest.mark.parametrize("ending", H2_ENDINGS)
def test_an_http2_connection_is_freed_at_once(serve: Any, ending: str, tmp_path: Any) -> None:
    settings: dict[str, Any] = {}
    tls = None
    if ending == "over TLS":  # h2 chosen by ALPN
        cert, key = make_cert(tmp_path)
        settings = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        tls = ssl.create_default_context(cafile=str(cert))
        tls.set_alpn_protocols(["h2"])
    streams.clear()
    with serve(h2_app, **settings) as srv, collector_off():
        registry = srv.server.state.connections  # type: ignore[union-attr]
        with H2Client(srv.host, srv.port, tls=tls, send_preface=False) as client:
            objects = [] if tls else open_connection_objects(srv)  # h2c: the HTTP/1.1 connection that sniffs it
            assert get(client).body == b"ok"
            conn = _only(registry)
            objects += weak(conn, conn.h2)
            del conn
            if ending in ("client resets a stream", "lost mid-stream"):
                waiting = client.request(path="/wait")
                wait_for(lambda: len(streams) == 6)  # its app runs
                if ending == "client resets a stream":
                    client.h2.reset_stream(waiting, 8)  # CANCEL
                    client.flush()
                    assert get(client).body == b"ok"
            if ending == "client's GOAWAY":
                client.h2.close_connection()
                client.flush()
                assert client.wait_closed()
            client.sock.close()
            wait_for(lambda: not registry)
            assert_freed(objects + streams)  # with the client's own objects still alive


def test_a_finished_http2_stream_is_freed_on_an_open_connection(serve: Any) -> None:
    streams.clear()
    with serve(h2_app) as srv, collector_off(), H2Client(srv.host, srv.port) as client:
        assert get(client).body == b"ok"
        assert_freed(list(streams))
        assert get(client).body == b"ok"  # the connection goes on


# -- HTTP/1.1 requests on unusual paths ----------------------------------------------------------
cycles: list[Any] = []  # weak references to each request's cycle and app task


async def h1_app(scope: Scope, receive: Any, send: Any) -> None:
    cycles.extend(weak(receive.__self__, receive.__self__.task))
    path = scope["path"]
    if path == "/error":
        raise RuntimeError("the app fails")
    if path == "/slow":  # until --timeout-request cancels it
        await asyncio.sleep(30)
    if path == "/body":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if path == "/stream":
        for piece in (b"o", b"k"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"" if path == "/stream" else b"ok"})


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No error log records: pytest keeps them for its report, and with them the traceback of
    an app's error (its frames hold the request)."""
    monkeypatch.setattr(logging.getLogger("uvworker.error"), "disabled", True)


CLOSE = [("Connection", "close")]
H1_PATHS = {
    "streamed response": (build_request(target="/stream", headers=CLOSE), 200),
    "body read": (build_request("POST", "/body", headers=CLOSE, body=b"x" * 200_000), 200),
    "app raises": (build_request(target="/error", headers=CLOSE), 500),
    "request timeout": (build_request(target="/slow", headers=CLOSE), 504),
    "refused mid-body": (build_request("POST", "/body", headers=[("Transfer-Encoding", "chunked")]) + b"2\r\nok\r\nzz\r\n", 400),
}


@pytest.mark.parametrize("case", list(H1_PATHS))
def test_an_http11_request_is_freed_at_once(serve: Any, case: str, quiet: None) -> None:
    request, status = H1_PATHS[case]
    cycles.clear()
    with serve(h1_app, timeout_request=0.3) as srv, collector_off():
        with Conn.open(srv.host, srv.port) as conn:
            objects = open_connection_objects(srv)
            conn.send(request)
            assert conn.read_response().status == status
            assert conn.read_until_close() == b""
        assert_freed(objects + cycles)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/error":
        raise RuntimeError("the app fails")
    if path == "/body":
        environ["wsgi.input"].read()
    start_response("200 OK", [])
    if path == "/stream":
        return (piece for piece in (b"o", b"k"))
    if path == "/slow":  # streams, then takes longer than --timeout-request

        def pieces() -> Any:
            yield b"o"
            time.sleep(0.6)
            yield b"k"

        return pieces()
    return [b"ok"]


WSGI_PATHS = {
    "whole response": (build_request(headers=CLOSE), 200),  # no task: Completions.drain writes it
    "body read": (build_request("POST", "/body", headers=CLOSE, body=b"x" * 200_000), 200),
    "streamed response": (build_request(target="/stream", headers=CLOSE), 200),
    "app raises": (build_request(target="/error", headers=CLOSE), 500),
    "request timeout": (build_request(target="/slow", headers=CLOSE), 200),  # cut after its first piece
}


@pytest.mark.parametrize("case", list(WSGI_PATHS))
def test_a_wsgi_request_is_freed_at_once(serve: Any, case: str, quiet: None) -> None:
    request, status = WSGI_PATHS[case]
    with serve(WSGIAdapter(wsgi_app), timeout_request=0.3) as srv, collector_off():
        with Conn.open(srv.host, srv.port) as conn:
            objects = open_connection_objects(srv)
            conn.send(request)
            assert conn.sock.recv(12) == b"HTTP/1.1 %d" % status
            assert conn.read_until_close()
        state = srv.server.state  # type: ignore[union-attr]
        wait_for(lambda: not state.abandoned, timeout=5)  # the thread set aside by the timeout is done
        assert_freed(objects)


# -- Gunicorn's per-request objects (pre_request, post_request, logger classes) -----------------
def test_gunicorn_request_objects_are_freed_at_once() -> None:
    scope = {
        "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/a", "raw_path": b"/a",
        "query_string": b"x=1", "root_path": "", "headers": [(b"host", b"example")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    with collector_off():
        request = gunicorn_request(scope)
        assert gunicorn_request(scope) is request  # one per request: what pre_request sets, post_request reads
        environ = wsgi_environ(scope)
        assert environ["asgi.scope"] is scope and request.uri == "/a?x=1"
        done = SimpleNamespace(scope=scope, status=200, response_headers=[], bytes_sent=0, response_started=True,
                               streaming=False)
        response = gunicorn_response(done)  # type: ignore[arg-type]
        assert response.req is request and request.body.read() == b""
        objects = weak(request, request.body, response)
        del request, environ, scope, done, response
        assert_freed(objects)
