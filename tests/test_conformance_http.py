"""HTTP/1.1 conformance odds a black-box suite sends that the parser corpus does not cover,
checked for what a client sees on the wire, on both parsers."""

from __future__ import annotations

from typing import Any

from tests.http_client import Conn, read_body, respond


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, body=await read_body(receive))


def test_expect_continue_with_the_body_already_sent_keeps_the_connection(serve: Any) -> None:
    """A client may send the body without waiting for 100 Continue (RFC 9110 §10.1.1; curl
    after its expect timeout, clients that never wait): once the whole body is in, nothing is
    left that the client could still be holding back, and the connection stays open. Before,
    the 100 that was never needed counted as not sent and the response closed the connection."""
    with serve(echo_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello")
        response = conn.read_final_response()
        assert (response.status, response.body) == (200, b"hello")
        assert not response.has_token("connection", "close")
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 200


async def host_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    hosts = b",".join(value for name, value in scope["headers"] if name == b"host")
    await respond(send, body=hosts + b" " + scope["raw_path"])


def test_absolute_form_target_names_the_host_whatever_host_says(serve: Any) -> None:
    """RFC 9112 §3.2.2: an origin server ignores Host for an absolute-form target and uses the
    target's authority: the app sees that authority as its one Host (also when the request had
    none, as HTTP/1.0 may), and the origin-form path. uvicorn and Gunicorn serve these too."""
    with serve(host_app) as srv, Conn.open(srv.host, srv.port) as conn:
        for request, seen in [
            (b"GET http://other.example:8080/a?b HTTP/1.1\r\nHost: example.com\r\n\r\n", b"other.example:8080 /a"),
            (b"GET http://example.com/b HTTP/1.1\r\nHost: example.com\r\n\r\n", b"example.com /b"),
            (b"GET http://other.example HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"other.example /"),
        ]:
            conn.send(request)
            response = conn.read_response()
            assert (response.status, response.body) == (200, seen)
