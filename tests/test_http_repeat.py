"""A connection keeps what it made of the last request head's fields (check_head's verdict,
from its second head on), and the process what it made of the last response's fields (their
encoded lines): a client sends the same fields request after request, an app the same headers
response after response. Kept values are used only for fields equal to those they were made
from, whatever the app did to the lists since.
"""

from __future__ import annotations

from typing import Any

from tests.http_client import Conn, build_request

def test_scope_headers_changed_by_the_app_are_checked_again(serve: Any) -> None:
    """The app adds a second Host to its scope's list; a next request whose head has exactly
    those fields is refused (two Host fields), not taken for the head checked before."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["headers"].append((b"host", b"other"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):  # a connection keeps the verdict from its second head on
            conn.send(build_request())
            assert conn.read_response().status == 200
        conn.send(build_request(headers=[("host", "testserver"), ("host", "other")]))
        resp = conn.read_response()
        assert resp.status == 400 and b"Duplicate Host" in resp.body


def test_same_fields_another_version(serve: Any) -> None:
    """The same fields in an HTTP/1.0 request after an HTTP/1.1 one: keep-alive is the 1.0
    rule's (the connection closes after it), not the verdict on the 1.1 head."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.get("connection") is None
        conn.send(build_request(version="1.0"))
        head = conn.read_head()
        assert head.status == 200 and head.has_token("connection", "close")
        assert conn.read_until_close() == b"ok"


def _changing_list_app(headers: list[Any], bodies: list[bytes], change: Any) -> Any:
    """Sends ``headers`` (the same list every time) and the next of ``bodies``, then
    ``change(headers)``."""
    pending = iter(bodies)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": next(pending)})
        change(headers)

    return app


def test_header_list_changed_between_responses(serve: Any) -> None:
    """An app that keeps one list of pairs and replaces a pair in it: each response is framed
    by the list as it is when sent."""
    headers: list[Any] = [(b"content-type", b"text/plain"), (b"content-length", b"5")]

    def change(headers: list[Any]) -> None:
        headers[1] = (b"content-length", b"2")

    app = _changing_list_app(headers, [b"hello", b"hi", b"hi"], change)
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for body in (b"hello", b"hi", b"hi"):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.body == body and resp.get_all("content-length") == [str(len(body))]
        conn.assert_open()


def test_header_pair_changed_in_place_between_responses(serve: Any) -> None:
    """The same with pairs that are lists, changed in place."""
    headers: list[Any] = [[b"content-length", b"5"], [b"x-n", b"0"]]

    def change(headers: list[Any]) -> None:
        headers[0][1] = b"2"
        headers[1][1] = b"%d" % (int(headers[1][1]) + 1)

    app = _changing_list_app(headers, [b"hello", b"hi", b"hi"], change)
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for n, body in enumerate((b"hello", b"hi", b"hi")):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.body == body and resp.get_all("x-n") == [str(n)]
        conn.assert_open()


def test_same_list_replacing_a_default_header(serve: Any) -> None:
    """The app's own Server header, in the same list on every response: each response has it
    once, and the server's default never."""
    headers = [(b"server", b"mine"), (b"content-length", b"2")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(3):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.get_all("server") == ["mine"] and resp.body == b"ok"
        conn.assert_open()


def test_connections_sending_the_same_fields_share_no_list(serve: Any) -> None:
    """Connections that send the same field block share what the process keeps of it: each
    request still gets a list of its own, whatever the apps of the others did to theirs, and
    the verdict is still this head's (a later Host twice is refused on either connection)."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = scope["headers"]
        seen.append(list(headers))
        headers[0] = (b"host", b"changed")
        headers.append((b"host", b"other"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as one, Conn.open(srv.host, srv.port) as two:
        for _ in range(3):  # kept from each connection's second head on
            for conn in (one, two):
                conn.send(build_request())
                assert conn.read_response().status == 200
        for conn in (one, two):
            conn.send(build_request(headers=[("host", "testserver"), ("host", "other")]))
            resp = conn.read_response()
            assert resp.status == 400 and b"Duplicate Host" in resp.body
    assert len(seen) == 6 and all(headers == seen[0] for headers in seen)
    assert seen[0][0][0] == b"host" and seen[0][0][1] != b"changed" and len(seen[0]) >= 1


def test_repeated_bodiless_heads_end_at_once(serve: Any) -> None:
    """A head read whole on the repeat path is the whole request (no end event follows it): the
    app's receive() gives the empty, last body at once, on every request; a POST with a body
    on the same connection after them still gets its body."""
    received: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        received.append(message)
        while message.get("more_body", False):
            message = await receive()
            received.append(message)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(4):  # from the third on, the repeat path
            conn.send(build_request())
            assert conn.read_response().status == 200
        conn.send(build_request("POST", headers=[("content-length", "5")]))
        conn.send(b"hello")
        assert conn.read_response().status == 200
    assert received[:4] == [{"type": "http.request", "body": b"", "more_body": False}] * 4
    assert b"".join(m["body"] for m in received[4:]) == b"hello" and not received[-1]["more_body"]


def test_same_header_list_other_heads(serve: Any) -> None:
    """The process keeps the last response head it made (status line, defaults, the app's
    lines, the framing's end): other fields, or the same header list under another status,
    another keep-alive answer (HTTP/1.0 keep-alive, Connection: close) or another framing (no
    Content-Length: chunked) get a head of their own, each time, in any order; and a second
    server with other defaults (no Server, no Date) in the same process gets its own."""
    length = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    html = [(b"content-type", b"text/html"), (b"content-length", b"2")]
    plain = [(b"content-type", b"text/plain")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        status = 404 if path.endswith("missing") else 200
        chunked = path.startswith("/chunked")
        headers = plain if chunked else html if path == "/html" else length
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok", "more_body": chunked})
        if chunked:
            await send({"type": "http.response.body", "body": b""})

    def check(resp: Any, status: int, *, connection: str | None = None, chunked: bool = False, server: bool = True,
              kind: str = "text/plain") -> None:
        assert (resp.status, resp.reason, resp.body) == (status, "OK" if status == 200 else "Not Found", b"ok")
        assert resp.get("connection") == connection and resp.chunked == chunked
        assert resp.get_all("content-length") == ([] if chunked else ["2"]) and resp.get_all("content-type") == [kind]
        assert (resp.get("server") is not None, resp.get("date") is not None) == (server, server)

    with serve(app) as srv, serve(app, server_header=False, date_header=False) as bare:
        with Conn.open(srv.host, srv.port) as conn, Conn.open(bare.host, bare.port) as other:
            for _ in range(2):  # the repeat paths run from a connection's second request on
                for target, status, chunked in (("/", 200, False), ("/missing", 404, False), ("/", 200, False),
                                                ("/html", 200, False), ("/chunked", 200, True), ("/chunked/missing", 404, True)):
                    for client, server in ((conn, True), (other, False), (conn, True)):
                        client.send(build_request(target=target))
                        kind = "text/html" if target == "/html" else "text/plain"
                        check(client.read_response(), status, chunked=chunked, server=server, kind=kind)
                conn.send(build_request(version="1.0", headers=[("Connection", "keep-alive")]))
                check(conn.read_response(), 200, connection="keep-alive")
                conn.send(build_request())
                check(conn.read_response(), 200)
            conn.send(build_request(headers=[("Connection", "close")]))
            check(conn.read_response(), 200, connection="close")
            assert conn.read_until_close() == b""
