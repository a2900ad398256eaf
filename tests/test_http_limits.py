"""Limits and hostile requests (issue 2: "Limits, timeouts and hostile clients").

Every rejected request gets a 4xx with ``Connection: close`` and the connection is closed, and
nothing after the bad request reaches the app (no request smuggling).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, Response, build_request, parse_responses, read_body, respond, wait_event


class PathApp:
    """Records the paths it was called with and echoes the request body."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        try:
            body = await read_body(receive)
        except ConnectionError:
            return
        await respond(send, body=body)


def reset_by_peer(conn: Conn) -> bool:
    """Whether a byte sent on ``conn`` (after the server's FIN) shows the server has closed its
    socket: the kernel answers it with a reset, which a later send or read raises."""
    try:
        conn.sock.send(b"x")
        conn.sock.settimeout(0.1)
        conn.sock.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        pass
    return False


def rejected(srv: Any, raw: bytes, status: int) -> Response:
    """Send ``raw`` plus a valid pipelined request; expect exactly one ``status`` response
    with Connection: close, then EOF."""
    with Conn.open(srv.host, srv.port) as conn:
        conn.send(raw + build_request(target="/smuggled"))
        data = conn.read_until_close()
    responses = parse_responses(data)
    assert [r.status for r in responses] == [status], data
    assert responses[0].has_token("connection", "close"), responses[0].headers
    return responses[0]


# -- request line and header limits ------------------------------------------------------------


def test_request_line_too_long_414(serve: Any) -> None:
    app = PathApp()
    with serve(app, limit_request_line=200) as srv:
        rejected(srv, build_request(target="/" + "a" * 300), 414)
        # Just under the limit is fine.
        ok = build_request(target="/" + "b" * 150, headers=[("Connection", "close")])
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(ok)
            assert conn.read_response().status == 200
    assert app.paths == ["/" + "b" * 150]


def test_limits_are_exact(serve: Any) -> None:
    """The limit itself is allowed, one more byte (or field) is not. The request line is
    counted without its CRLF; a field as "Name: value"; the field count includes Host."""
    settings = {"limit_request_line": 200, "limit_request_field_size": 100, "limit_request_fields": 5}
    with serve(PathApp(), **settings) as srv:

        def status(raw: bytes) -> int:
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(raw)
                return conn.read_response().status

        for length, expected in ((200, 200), (201, 414)):
            target = "/" + "a" * (length - len("GET / HTTP/1.1"))
            assert status(build_request(target=target)) == expected, length
        for length, expected in ((100, 200), (101, 431)):
            assert status(build_request(headers=[("X-A", "v" * (length - len("X-A: ")))])) == expected, length
        for count, expected in ((5, 200), (6, 431)):
            assert status(build_request(headers=[(f"X-{i}", "1") for i in range(count - 1)])) == expected, count


def test_head_bound_is_exact_and_0_leaves_it_to_the_other_limits(serve: Any) -> None:
    """--limit-request-head counts the whole head as sent, CRLFs and the empty line included:
    128 KiB by default; 0 leaves only the line and field limits (as under Gunicorn)."""
    def status(srv: Any, raw: bytes) -> int:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(raw)
            return conn.read_response().status

    base = len(build_request(headers=[("X-A", "")]))
    with serve(PathApp(), limit_request_head=1000) as srv:
        for size, expected in ((1000, 200), (1001, 431)):
            assert status(srv, build_request(headers=[("X-A", "v" * (size - base))])) == expected, size
    big = build_request(headers=[(f"X-{i}", "v" * 8000) for i in range(30)])  # 240 KB
    with serve(PathApp()) as srv:
        rejected(srv, big, 431)
    with serve(PathApp(), limit_request_head=0) as srv:
        assert status(srv, big) == 200


def test_request_line_limit_is_on_by_default(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, build_request(target="/" + "a" * 100_000), 414)
    assert app.paths == []


def test_header_field_too_large_431(serve: Any) -> None:
    app = PathApp()
    with serve(app, limit_request_field_size=200) as srv:
        rejected(srv, build_request(headers=[("X-Big", "v" * 300)]), 431)
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(headers=[("X-Small", "v" * 100)]))
            assert conn.read_response().status == 200
    assert app.paths == ["/"]


def test_header_field_limit_is_on_by_default(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, build_request(headers=[("X-Big", "v" * 100_000)]), 431)
    assert app.paths == []


def test_too_many_header_fields_431(serve: Any) -> None:
    app = PathApp()
    with serve(app, limit_request_fields=10) as srv:
        rejected(srv, build_request(headers=[(f"X-H{i}", "1") for i in range(20)]), 431)
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(headers=[(f"X-H{i}", "1") for i in range(5)]))
            assert conn.read_response().status == 200
    assert app.paths == ["/"]


def test_header_count_limit_is_on_by_default(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, build_request(headers=[(f"X-H{i}", "1") for i in range(2000)]), 431)
    assert app.paths == []


# -- malformed requests ------------------------------------------------------------------------

MALFORMED = {
    "garbage": b"THIS IS NOT HTTP\r\n\r\n",
    "no-target": b"GET\r\nHost: x\r\n\r\n",
    "bad-method-char": b"GE(T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "extra-token": b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul-in-header-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_400(serve: Any, raw: bytes) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, raw, 400)
    assert app.paths == []


BAD_FRAMING = {
    "cl-not-a-number": ([("Content-Length", "abc")], 400),
    "cl-negative": ([("Content-Length", "-1")], 400),
    "cl-plus-sign": ([("Content-Length", "+5")], 400),
    "cl-two-numbers": ([("Content-Length", "5 5")], 400),
    "cl-list": ([("Content-Length", "5, 5")], 400),
    "cl-duplicate-same": ([("Content-Length", "5"), ("Content-Length", "5")], 400),
    "cl-duplicate-different": ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    "cl-and-te": ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
    "te-and-cl": ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400),
    "te-chunked-twice": ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], 400),
    "te-chunked-twice-list": ([("Transfer-Encoding", "chunked, chunked")], 400),
    # RFC 9112 §6.1: a transfer coding the server does not implement gets 501 (and the close).
    "te-gzip": ([("Transfer-Encoding", "gzip")], 501),
    "te-chunked-not-last": ([("Transfer-Encoding", "chunked, gzip")], 501),
    "te-gzip-then-chunked": ([("Transfer-Encoding", "gzip, chunked")], 501),
    "te-identity": ([("Transfer-Encoding", "identity")], 501),
}


@pytest.mark.parametrize(("headers", "status"), list(BAD_FRAMING.values()), ids=list(BAD_FRAMING))
def test_ambiguous_or_unknown_body_framing_refused(serve: Any, headers: list[tuple[str, str]], status: int) -> None:
    app = PathApp()
    # The "body" is itself a request: a server that mis-frames would answer it.
    body = b"5\r\nhello\r\n0\r\n\r\n" + build_request(target="/inner")
    with serve(app) as srv:
        rejected(srv, build_request("POST", headers=headers) + body, status)
    assert app.paths == []


def test_http10_transfer_encoding_closes_after_the_message(serve: Any) -> None:
    # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request means faulty framing; the server
    # may reject it or process it, but must close the connection after it (no keep-alive).
    app = PathApp()
    raw = b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(raw + b"GET /smuggled HTTP/1.0\r\n\r\n")
        data = conn.read_until_close()
    responses = parse_responses(data)
    assert len(responses) == 1 and responses[0].status in (200, 400), data
    assert "/smuggled" not in app.paths


def test_invalid_chunk_size_rejected(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + b"zz\r\nhello\r\n0\r\n\r\n")
        data = conn.read_until_close()
    # The app was already called (headers were fine) but had not answered: the client gets
    # a 400 and a closed connection.
    assert [r.status for r in parse_responses(data)] == [400], data


@pytest.mark.parametrize(
    "chunks",
    [b"5\r\nhelloXX0\r\n\r\n", b"-5\r\nhello\r\n0\r\n\r\n", b"5x\r\nhello\r\n0\r\n\r\n"],
    ids=["missing-crlf", "negative-size", "junk-after-size"],
)
def test_malformed_chunked_body_rejected(serve: Any, chunks: bytes) -> None:
    app = PathApp()
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + chunks + build_request(target="/smuggled"))
        data = conn.read_until_close()
    assert [r.status for r in parse_responses(data)] == [400], data
    assert "/smuggled" not in app.paths


def test_chunk_size_beyond_64_bits_400(serve: Any) -> None:
    # More than 16 hex digits (after leading zeros) is refused at once by both parsers: no
    # reader can wrap it around to a small size and take what follows for a request.
    app = PathApp()
    chunks = b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n"
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + chunks + build_request(target="/smuggled"))
        data = conn.read_until_close(timeout=3.0)
    assert [r.status for r in parse_responses(data)] == [400], data
    assert "/smuggled" not in app.paths


@pytest.mark.parametrize(
    "raw",
    [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n"],
    ids=["h2-preface", "http2-version", "http3-version"],
)
def test_other_major_versions_not_served(serve: Any, raw: bytes) -> None:
    # RFC 9110 §6.2 / RFC 9112 §2.3: an HTTP/1 server does not serve other major versions
    # (505, the HTTP/2 preface included, when HTTP/2 is off: with it on, the preface opens an
    # h2c connection, tests/test_http2.py); the app never sees such a request.
    app = PathApp()
    with serve(app, http2=False) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(raw)
        data = conn.read_until_close()
    assert [r.status for r in parse_responses(data)] == [505], data
    assert app.paths == []


def test_http11_without_host_400(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, b"GET / HTTP/1.1\r\n\r\n", 400)
    assert app.paths == []


def test_http11_with_two_host_headers_400(serve: Any) -> None:
    app = PathApp()
    with serve(app) as srv:
        rejected(srv, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
    assert app.paths == []


def test_http10_without_host_is_fine(serve: Any) -> None:
    with serve(PathApp()) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.read_response().status == 200


# -- load shedding -----------------------------------------------------------------------------


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_limit_concurrency_503(serve: Any, interface: str) -> None:
    """Over the limit a request is answered 503, by an ASGI app or by one that takes each
    request's cycle itself, without an ASGI task (the WSGI adapter: ServerState.direct): the
    limit is checked before such an app gets the cycle."""
    release = threading.Event()
    entered = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/block":
            entered.set()
            await wait_event(release)
        await respond(send, body=scope["path"].encode())

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["PATH_INFO"].encode()
        if body == b"/block":
            entered.set()
            release.wait(10)
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with serve(app if interface == "asgi" else wsgi_app, limit_concurrency=1) as srv:
        with Conn.open(srv.host, srv.port) as busy:
            busy.send(build_request(target="/block"))
            wait_for(entered.is_set)
            with Conn.open(srv.host, srv.port) as shed:
                shed.send(build_request(target="/shed"))
                resp = shed.read_response(timeout=1.0)  # at once, not after the busy one
                assert resp.status == 503
                assert resp.has_token("connection", "close")
                shed.read_until_close()
            # The shed connection, which its client keeps open and silent after our FIN, is
            # closed once the linger is over (LINGER_TIME, 2 s): a byte sent then meets a reset.
            # (Its request ended after the 503 began the linger and cleared its deadline: kept
            # until the client's FIN, a descriptor for every shed client that never closes.)
            with Conn.open(srv.host, srv.port) as silent:
                silent.send(build_request(target="/shed"))
                assert silent.read_response(timeout=1.0).status == 503
                silent.read_until_close()
                wait_for(lambda: reset_by_peer(silent), timeout=15, interval=0.25)
            release.set()
            assert busy.read_response().body == b"/block"
        # Load shedding is temporary.
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/after"))
            assert conn.read_response().body == b"/after"
