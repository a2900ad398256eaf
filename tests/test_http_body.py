"""Request bodies, flow control both ways, 100-continue and http.disconnect (issue 2)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, parse_responses, read_body, respond, wait_event, send_body, wait_until_stalled

MiB = 1024 * 1024


class Recorder:
    """An app that records every received message and echoes the body it read."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            self.messages.append(message)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await respond(send, body=body)


def test_content_length_body_arrives_as_a_stream(serve: Any) -> None:
    app = Recorder()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Content-Length", "15")]) + b"first")
        wait_for(lambda: len(app.messages) >= 1)
        conn.send(b"second")
        wait_for(lambda: len(app.messages) >= 2)
        conn.send(b"last")
        resp = conn.read_response()
        assert resp.body == b"firstsecondlast"
        assert all(m["type"] == "http.request" for m in app.messages)
        assert len(app.messages) >= 3
        assert [m.get("more_body", False) for m in app.messages][-1] is False
        assert all(m.get("more_body") for m in app.messages[:-1])


def test_chunked_body_with_extensions_and_trailers(serve: Any) -> None:
    app = Recorder()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + b"5;name=value\r\nhello\r\n")
        wait_for(lambda: len(app.messages) >= 1)
        conn.send(b"6;a=1;b=\"q\"\r\n world\r\n0\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world"
        assert len(app.messages) >= 2 and app.messages[0]["more_body"] is True
        # The trailers were consumed: the connection is still in sync for the next request.
        conn.send(build_request("POST", body=b"next"))
        assert conn.read_response().body == b"next"


def test_chunked_body_in_one_packet(serve: Any) -> None:
    with serve(Recorder()) as srv, Conn.open(srv.host, srv.port) as conn:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [b"a" * 100, b"b" * 4000, b"c"])
        conn.send(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + chunks + b"0\r\n\r\n")
        resp = conn.read_response()
        assert resp.body == b"a" * 100 + b"b" * 4000 + b"c"


def test_get_without_body_receives_empty_final_message(serve: Any) -> None:
    app = Recorder()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().body == b""
        assert app.messages[0]["type"] == "http.request"
        assert app.messages[0].get("body", b"") == b""
        assert app.messages[0].get("more_body", False) is False


def test_large_body_intact(serve: Any) -> None:
    payload = hashlib.sha256(b"seed").digest() * (4 * MiB // 32)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        await respond(send, body=f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("PUT", body=payload))
        resp = conn.read_response(timeout=10)
        assert resp.body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()


def test_unread_small_body_does_not_desync_the_connection(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=scope["path"].encode())  # never reads the body

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", "/first", body=b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert conn.read_response().body == b"/first"
        conn.send(build_request("GET", "/second"))
        # The server may drain the unread body or close; it must never parse it as a request.
        try:
            second = conn.read_response()
        except AssertionError:  # Closed: the server chose to close instead of draining
            return
        assert second.body == b"/second"


def test_unread_large_body_answered_then_closed_or_drained(serve: Any) -> None:
    """An app that answers without reading a 10 MiB upload: the client still gets the answer
    while it is sending, and the connection is then either closed or reusable, never desynced."""
    total = 10 * MiB

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, status=413, body=scope["path"].encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", "/big", headers=[("Content-Length", str(total))]))
        sender = threading.Thread(target=conn.send, args=(b"GET /x HTTP/1.1\r\n\r\n" * (total // 20),), daemon=True)
        sender.start()
        resp = conn.read_response()
        assert (resp.status, resp.body) == (413, b"/big")
        sender.join(timeout=10)
        assert not sender.is_alive(), "the server neither drained nor closed: the client is stuck"
        if resp.has_token("connection", "close"):
            assert conn.read_until_close() == b""
            return
        conn.send(build_request(target="/next"))
        try:
            data = conn.read_until_close(timeout=3)
        except AssertionError:  # still open: the body was drained; the next request is answered
            return
        for later in parse_responses(data):  # nothing from the "GET /x" lines in the body
            assert later.body in (b"/next",), data


# -- flow control ------------------------------------------------------------------------------


def test_upload_backpressure_when_app_does_not_read(serve: Any) -> None:
    """An app that does not read a 50 MiB upload: the server must stop reading the socket,
    so the client's sends stall after a bounded amount (socket buffers + a small user-space
    buffer), and resume once the app reads."""
    total = 50 * MiB
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await wait_event(release, timeout=20)
        received = 0
        while True:
            message = await receive()
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await respond(send, body=str(received).encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port, sndbuf=65536) as conn:
        conn.send(build_request("POST", "/upload", headers=[("Content-Length", str(total))]))
        sent = send_body(conn, total)
        # Loopback socket buffers can reach a few MiB; a server that buffers the upload in
        # memory would have taken all 50 MiB here.
        assert sent < 4 * MiB, f"server accepted {sent / MiB:.1f} MiB from an app that reads nothing"
        release.set()
        send_body(conn, total, sent, stall=None)
        resp = conn.read_response(timeout=10)
        assert resp.status == 200
        assert resp.body == str(total).encode()


def test_body_timeout_does_not_fire_while_app_is_not_reading(serve: Any) -> None:
    """timeout_request_body is for a client that stalls, not for an app that is busy."""
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await wait_event(release)
        body = await read_body(receive)
        await respond(send, body=str(len(body)).encode())

    total = 8 * MiB
    with serve(app, timeout_request_body=0.3) as srv, Conn.open(srv.host, srv.port, sndbuf=65536) as conn:
        conn.send(build_request("POST", headers=[("Content-Length", str(total))]))
        sender = threading.Thread(target=conn.send, args=(b"y" * total,), daemon=True)
        sender.start()
        sender.join(timeout=1.0)  # deliberately let the server sit paused past its body timeout
        release.set()
        sender.join(timeout=10)
        resp = conn.read_response(timeout=10)
        assert (resp.status, resp.body) == (200, str(total).encode())


def test_response_backpressure_send_waits_while_client_does_not_read(serve: Any) -> None:
    total = 48 * MiB
    chunk = b"z" * (256 * 1024)
    progress = {"sent": 0, "done": False}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(total).encode())]})
        for _ in range(total // len(chunk)):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            progress["sent"] += len(chunk)
        await send({"type": "http.response.body", "body": b""})
        progress["done"] = True

    with serve(app) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
        conn.send(build_request())
        wait_until_stalled(lambda: progress["sent"])
        assert not progress["done"]
        assert progress["sent"] < 8 * MiB, f"app wrote {progress['sent'] / MiB:.1f} MiB to a client that reads nothing"
        resp = conn.read_response(timeout=20)
        assert len(resp.body) == total
        wait_for(lambda: progress["done"])


def test_pipelining_client_that_never_reads_is_bounded(serve: Any) -> None:
    """A client pipelines requests and never reads the responses: once the write buffer is
    full the server must stop taking requests off the socket (else it buffers every
    response in memory), so the client's sends stall."""
    calls = {"n": 0}
    body = b"r" * 4096

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls["n"] += 1
        await respond(send, body=body)

    blob = build_request(target="/p") * 1000
    bound = 16 * MiB // len(body)  # responses that may sit in socket + transport buffers
    with serve(app) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536, sndbuf=65536) as conn:
        conn.sock.settimeout(0.5)
        deadline = time.monotonic() + 15  # generous: a loaded machine answers slowly
        stalled = False
        while time.monotonic() < deadline and calls["n"] < bound:
            try:
                conn.sock.send(blob)
            except socket.timeout:
                stalled = True
                break
        assert calls["n"] < bound, f"server answered {calls['n']} requests nobody reads ({calls['n'] * 4} KiB buffered)"
        assert stalled


# -- Expect: 100-continue ----------------------------------------------------------------------


def test_100_continue_sent_when_app_reads(serve: Any) -> None:
    app = Recorder()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "4")]))
        interim = conn.read_head()
        assert interim.status == 100
        conn.send(b"data")
        final = conn.read_response()
        assert (final.status, final.body) == (200, b"data")
        # Next request on the same connection: no stray 100 left behind.
        conn.send(build_request("POST", body=b"again"))
        assert conn.read_response().body == b"again"


def test_100_continue_not_sent_when_app_answers_without_reading(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, status=413, body=b"too big")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "100000")]))
        resp = conn.read_response()
        assert resp.status == 413  # the final response comes first, no "100 Continue"
        assert resp.body == b"too big"
        # RFC 9110 §10.1.1: the client may still send the body. The server either closed
        # (saying so) or discards it; it never reads the body as the next request.
        conn.send(b"x" * 99_990 + b"GET /\r\n" + build_request(target="/next"))
        if resp.has_token("connection", "close"):
            assert conn.read_until_close() == b""
        else:
            assert conn.read_response().status == 413


def test_100_continue_never_sent_to_http10(serve: Any) -> None:
    receiving = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        receiving.set()
        body = await read_body(receive)
        await respond(send, body=body)

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        wait_for(receiving.is_set)
        with pytest.raises(TimeoutError):  # a deliberate quiet window: nothing may arrive
            conn.read_head(timeout=0.3)
        conn.send(b"data")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"data")


def test_100_continue_not_sent_when_body_already_arrived(serve: Any) -> None:
    app = Recorder()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Expect", "100-continue")], body=b"eager"))
        resp = conn.read_response()
        # A 100 here is allowed by RFC 9110 but pointless; what matters is the final answer.
        if resp.status == 100:
            resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"eager")


# -- http.disconnect ---------------------------------------------------------------------------


def test_disconnect_before_response(serve: Any) -> None:
    """With the body read and no response yet, receive() blocks until the client goes away,
    then returns http.disconnect (it must not return it early)."""
    got: list[tuple[str, bool]] = []
    waiting = threading.Event()
    closed = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = await receive()
        got.append((first["type"], closed.is_set()))
        waiting.set()
        second = await asyncio.wait_for(receive(), timeout=5)
        got.append((second["type"], closed.is_set()))

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port)
        conn.send(build_request())
        wait_for(waiting.is_set)
        closed.set()
        conn.close()
        wait_for(lambda: len(got) == 2)
        assert got == [("http.request", False), ("http.disconnect", True)]


def test_disconnect_while_streaming_response(serve: Any) -> None:
    """An endless stream (think server-sent events) learns that the client left: receive()
    returns http.disconnect, or send() raises OSError (ASGI spec 2.4)."""
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def listen() -> None:
            message = await receive()
            while message["type"] != "http.disconnect":
                message = await receive()

        listener = asyncio.ensure_future(listen())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        try:
            for _ in range(500):
                if listener.done():
                    outcome.append("disconnect")
                    return
                await send({"type": "http.response.body", "body": b"data: tick\n\n", "more_body": True})
                await asyncio.sleep(0.01)
            outcome.append("never noticed")
        except OSError:
            outcome.append("send raised")
        finally:
            listener.cancel()

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port)
        conn.send(build_request())
        assert conn.read_head().status == 200
        conn.read_until(b"data: tick", time.monotonic() + 3)
        conn.close()
        wait_for(lambda: outcome, timeout=4)
        assert outcome[0] in ("disconnect", "send raised")


def test_disconnect_during_body(serve: Any) -> None:
    got: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await asyncio.wait_for(receive(), timeout=5)
            got.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port)
        conn.send(build_request("POST", headers=[("Content-Length", "100")]) + b"only ten b")
        wait_for(lambda: got)
        conn.close()
        wait_for(lambda: got[-1]["type"] == "http.disconnect")
        assert b"".join(m.get("body", b"") for m in got) == b"only ten b"


def test_disconnect_after_response(serve: Any) -> None:
    got: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await respond(send, body=b"done")
        message = await asyncio.wait_for(receive(), timeout=5)
        got.append(message["type"])

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port)
        conn.send(build_request())
        assert conn.read_response().body == b"done"
        conn.close()
        wait_for(lambda: got)
        assert got == ["http.disconnect"]


def test_send_after_disconnect_does_not_crash_server(serve: Any) -> None:
    gone = threading.Event()
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/ok":
            await respond(send, body=b"ok")
            return
        await wait_event(gone)
        await asyncio.sleep(0.05)  # let the server see the EOF
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"late"})
            outcome.append("ignored")
        except OSError:
            outcome.append("raised")

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port)
        conn.send(build_request(target="/late"))
        conn.close()
        gone.set()
        wait_for(lambda: outcome)
        with Conn.open(srv.host, srv.port) as other:
            other.send(build_request(target="/ok"))
            assert other.read_response().body == b"ok"
