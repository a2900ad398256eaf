"""Response framing as a client sees it (issue 2: HTTP/1.1 behaviour).

Content-Length from the app when given, chunked on HTTP/1.1 otherwise, close-delimited for
HTTP/1.0, no body for HEAD/204/304; a body that disagrees with its Content-Length closes the
connection rather than desynchronising it: a 500 when nothing was written yet, else the
declared bytes at most, then the close (issue 11 item 4).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.http_client import Conn, build_request, capture_log, parse_responses


def parts_app(status: int = 200, headers: list[tuple[bytes, bytes]] | None = None, parts: list[bytes] | None = None) -> Any:
    """An app that sends ``parts`` as successive body messages (the last with more_body=False)."""
    body_parts = parts if parts is not None else [b"hello"]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers or []})
        for i, part in enumerate(body_parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(body_parts) - 1})
        if not body_parts:
            await send({"type": "http.response.body", "body": b""})

    return app


def assert_declared_prefix_then_close(data: bytes, sent: bytes) -> None:
    """After a Content-Length mismatch with the head already out, the client sees the 200 head
    and at most the declared bytes, then the close: never silence, never bytes beyond the
    declared length (a client reusing the connection would read them as the next response)."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.count(b"HTTP/1.") == 1, data
    assert sent.startswith(body), data


def assert_one_500(data: bytes) -> None:
    """A mismatch found before anything was written: one complete 500, then the close."""
    (resp,) = parse_responses(data)
    assert resp.status == 500 and resp.has_token("connection", "close"), data


def test_app_content_length_is_used(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"11")], parts=[b"hello", b" ", b"world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.get_all("content-length") == ["11"]
            assert resp.get("transfer-encoding") is None
            assert resp.body == b"hello world"
        conn.assert_open()


def test_chunked_on_http11_without_content_length(serve: Any) -> None:
    app = parts_app(parts=[b"hello", b"", b" world", b""])  # empty parts must not end the body
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.chunked
            assert resp.get("content-length") is None
            assert resp.body == b"hello world"
        conn.assert_open()


def test_close_delimited_for_http10(serve: Any) -> None:
    app = parts_app(parts=[b"hello", b" world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        resp = conn.read_head()
        assert resp.status == 200
        assert resp.get("transfer-encoding") is None
        assert conn.read_until_close() == b"hello world"


def test_http10_keep_alive_without_length_is_close_delimited(serve: Any) -> None:
    app = parts_app(parts=[b"hello", b" world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = conn.read_head()
        assert resp.get("transfer-encoding") is None
        assert not resp.has_token("connection", "keep-alive")
        assert conn.read_until_close() == b"hello world"


def test_body_longer_than_content_length_before_anything_is_sent_is_a_500(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"5")], parts=[b"hello world"])
    with capture_log("uvworker.error") as errors, serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/second"))
        assert_one_500(conn.read_until_close())
    assert any("Content-Length" in r.getMessage() or r.exc_info for r in errors)


def test_body_longer_than_content_length_after_the_head_stops_at_the_declared_bytes(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"5")], parts=[b"hel", b"lo", b" world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/second"))
        data = conn.read_until_close()
        assert data.endswith(b"\r\n\r\nhello"), data
        assert_declared_prefix_then_close(data, b"hello")


def test_body_longer_than_content_length_in_one_later_piece(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"5")], parts=[b"hel", b"lo world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        data = conn.read_until_close()
        assert data.endswith(b"\r\n\r\nhello"), data  # the declared bytes, then the close


def test_body_shorter_than_content_length_closes(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"10")], parts=[b"hel", b"lo"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/second"))
        data = conn.read_until_close()
        assert data.endswith(b"\r\n\r\nhello"), data
        assert_declared_prefix_then_close(data, b"hello")


@pytest.mark.parametrize("parts", [[b"hel"], [b""]], ids=["short", "empty"])
def test_body_shorter_than_content_length_in_one_message_is_a_500(serve: Any, parts: list[bytes]) -> None:
    app = parts_app(headers=[(b"content-length", b"10")], parts=parts)
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/second"))
        assert_one_500(conn.read_until_close())


def test_head_response_has_headers_but_no_body(serve: Any) -> None:
    app = parts_app(headers=[(b"content-length", b"5")], parts=[b"hello"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("HEAD") + build_request("GET"))
        head = conn.read_response("HEAD")
        assert head.status == 200
        assert head.get("content-length") == "5"
        get = conn.read_response("GET")  # would fail to parse if the HEAD body had been sent
        assert get.status == 200 and get.body == b"hello"
        conn.assert_open()


def test_head_response_without_length_has_no_body(serve: Any) -> None:
    app = parts_app(parts=[b"hello", b" world"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("HEAD") + build_request("GET"))
        head = conn.read_response("HEAD")
        assert head.status == 200
        get = conn.read_response("GET")
        assert get.status == 200 and get.body == b"hello world"
        conn.assert_open()


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(serve: Any, status: int) -> None:
    app = parts_app(status=status, parts=[])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/2"))
        for _ in range(2):
            resp = conn.read_response()
            assert resp.status == status
            assert resp.get("transfer-encoding") is None
            if status == 204:
                assert resp.get("content-length") is None  # RFC 9110 §8.6: MUST NOT
        conn.assert_open()


@pytest.mark.parametrize("length", [b"0", b"5"])
def test_a_204_drops_the_apps_content_length(serve: Any, length: bytes) -> None:
    """RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204. One the app sets (some
    frameworks send "0") is left out; the other fields stay. Before, it passed through, as in
    uvicorn and Gunicorn."""
    app = parts_app(status=204, headers=[(b"Content-Length", length), (b"x-kept", b"1")], parts=[])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/2"))
        for _ in range(2):
            resp = conn.read_response()
            assert (resp.status, resp.get("content-length"), resp.get("x-kept")) == (204, None, "1")
        conn.assert_open()


def test_304_keeps_app_content_length_without_body(serve: Any) -> None:
    app = parts_app(status=304, headers=[(b"content-length", b"5"), (b"etag", b'"x"')], parts=[])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/2"))
        first, second = conn.read_response(), conn.read_response()
        assert first.status == second.status == 304
        assert first.get("etag") == '"x"'
        conn.assert_open()


def test_interim_100_continue_has_no_body(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": message["body"][:3]})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "3")]))
        interim = conn.read_head()
        assert interim.status == 100
        assert conn.buf == b""  # nothing after the interim head until the body is sent
        conn.send(b"abc")
        final = conn.read_response()
        assert (final.status, final.body) == (200, b"abc")


def test_large_chunked_response(serve: Any) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    app = parts_app(parts=[chunk] * 32)  # 2 MiB
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response(timeout=10)
        assert resp.chunked
        assert resp.body == chunk * 32


def test_no_response_is_chunked_to_http10(serve: Any) -> None:
    app = parts_app(parts=[b"a", b"b", b"c"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = conn.read_until_close()
        (resp,) = parse_responses(data)
        assert not resp.chunked
        assert resp.body == b"abc"


@pytest.mark.parametrize(
    "start",
    [
        {"type": "http.response.start", "status": 200, "headers": [(b"X-Upper", b"1")]},
        {"type": "http.response.start", "status": 200, "headers": [[b"x-upper", b"1"]]},
    ],
    ids=["uppercase-name", "list-pairs"],
)
def test_asgi_header_forms_accepted(serve: Any, start: dict[str, Any]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(start)
        await send({"type": "http.response.body"})  # "body" defaults to b""

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request())
        for _ in range(2):
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.get("x-upper") == "1"
            assert resp.body == b""
        conn.assert_open()


def test_large_response_header(serve: Any) -> None:
    cookie = b"c" * 100_000
    app = parts_app(headers=[(b"set-cookie", cookie), (b"content-length", b"2")], parts=[b"ok"])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.get("set-cookie") == cookie.decode()
        assert resp.body == b"ok"


LARGE = [bytes([65 + i]) * (200_000 + i) for i in range(3)]  # pieces written by reference


@pytest.mark.parametrize(
    ("headers", "parts"),
    [
        ([], [LARGE[0]]),  # one body: Content-Length from us
        ([(b"content-length", b"%d" % (len(LARGE[0]) + 5))], [LARGE[0], b"small"]),
        ([], [b"small", LARGE[0], b"", LARGE[1], b"tail", LARGE[2]]),  # chunked, mixed sizes
    ],
    ids=["single", "content-length", "chunked"],
)
def test_large_body_pieces_arrive_whole_and_in_order(serve: Any, headers: Any, parts: list[bytes]) -> None:
    with serve(parts_app(headers=headers, parts=parts)) as srv, Conn.open(srv.host, srv.port) as conn:
        for method in ("GET", "HEAD", "GET"):
            conn.send(build_request(method))
            resp = conn.read_response(method, timeout=10)
            assert resp.body == (b"" if method == "HEAD" else b"".join(parts))
        conn.assert_open()
    # HTTP/1.0 without a length: close-delimited (or the app's Content-Length).
    with serve(parts_app(headers=headers, parts=parts)) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.read_until_close(10).split(b"\r\n\r\n", 1)[1] == b"".join(parts)


def test_whole_body_in_one_piece_of_its_content_length(serve: Any) -> None:
    """The common response: the app's Content-Length and the whole body in one message, of any
    bytes-like type and size, GET or HEAD, with the request's body read or not: each one whole,
    the connection kept (a request body left unread is read and dropped first)."""
    bodies: list[Any] = [b"hello", bytearray(b"hello"), memoryview(b"hello"), b"x" * (128 * 1024), b""]
    pending = iter(bodies * 2 + [b"hello"])  # the last for HEAD

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = next(pending)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for method, request_body in (("GET", b""), ("POST", b"unread body")):
            for body in bodies:
                conn.send(build_request(method, body=request_body))
                resp = conn.read_response(timeout=10)
                assert resp.status == 200 and resp.body == bytes(body)
                assert resp.get("connection") is None and resp.get("transfer-encoding") is None
        conn.send(build_request("HEAD"))
        assert conn.read_response("HEAD").body == b""
        conn.assert_open()


def test_whole_responses_after_a_streamed_one_go_out_in_order_without_the_batch(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed response's pieces go through the connection's write batch (one write per loop
    turn), its last piece after them; a whole response goes straight to the transport, the
    batch not even read (Connection.batching: at 1024 connections it is a cold object by its
    connection's turn). On one connection, in any order, every body arrives whole."""
    from uvworker.protocols.batch import WriteBatch

    reads: list[int] = []
    member = WriteBatch.__dict__["parts"]  # the slot's own descriptor

    class Watched:
        def __get__(self, batch: Any, owner: Any = None) -> Any:
            if batch is None:
                return self
            reads.append(1)
            return member.__get__(batch, owner)

        def __set__(self, batch: Any, value: Any) -> None:
            member.__set__(batch, value)

    monkeypatch.setattr(WriteBatch, "parts", Watched())
    pieces = [b"one ", b"two ", b"three"]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        streamed = scope["path"] == "/stream"
        parts = pieces if streamed else [b"whole"]
        await send({"type": "http.response.start", "status": 200, "headers": [] if streamed else [(b"content-length", b"5")]})
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for target in ("/", "/stream", "/", "/stream", "/"):
            conn.send(build_request(target=target))
            assert conn.read_response().body == (b"".join(pieces) if target == "/stream" else b"whole")
        # (by this response the batch's flush for the stream, a loop callback, has run too)
        reads.clear()
        for _ in range(3):
            conn.send(build_request())
            assert conn.read_response().body == b"whole"
        assert not reads
        conn.assert_open()
