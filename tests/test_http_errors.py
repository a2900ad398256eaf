"""Application errors as a client sees them (issue 2: exceptions, invalid response headers).

Before ``http.response.start`` reaches the wire an app error is a 500; after it the connection
is closed (the client can tell the response is incomplete). Each error is logged once, with its
traceback, on "uvworker.error". Invalid header names/values never become bytes on the wire.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, capture_log, error_tracebacks, parse_responses, respond


class Boom(Exception):
    pass


def assert_500_without_internals(conn: Conn) -> None:
    resp = conn.read_response()
    assert resp.status == 500
    assert b"Boom" not in resp.body and b"Traceback" not in resp.body  # no internals leaked


def test_exception_before_response_start_is_500(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise Boom("kaput-before-start")

    with capture_log() as records:
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            assert_500_without_internals(conn)
            wait_for(lambda: error_tracebacks(records))
    logged = error_tracebacks(records)
    assert len(logged) == 1, [r.getMessage() for r in records]
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is Boom


def test_server_keeps_serving_after_app_error(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/fail":
            raise Boom("nope")
        await respond(send, body=b"fine")

    with capture_log():
        with serve(app) as srv:
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(build_request(target="/fail"))
                assert conn.read_response().status == 500
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(build_request(target="/ok"))
                assert conn.read_response().body == b"fine"


def test_exception_after_response_start_closes_connection(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise Boom("kaput-after-start")

    with capture_log() as records:
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request() + build_request(target="/second"))
            data = conn.read_until_close()
            wait_for(lambda: error_tracebacks(records))
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.count(b"HTTP/1.") == 1  # the pipelined request was not answered
    assert b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # no last-chunk: the client sees it is truncated
    logged = error_tracebacks(records)
    assert len(logged) == 1
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is Boom


def test_exception_after_start_with_content_length_closes(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        raise Boom("midway")

    with capture_log():
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            data = conn.read_until_close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"12345"


def test_app_returning_without_response_is_500(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return None

    with capture_log() as records:
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            assert conn.read_response().status == 500
            wait_for(lambda: [r for r in records if r.levelno >= 40])


def test_app_returning_mid_response_closes(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})

    with capture_log():
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request() + build_request(target="/second"))
            data = conn.read_until_close()
    assert data.count(b"HTTP/1.") == 1
    assert not data.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(
    "message",
    [
        {"type": "http.response.body", "body": b"body before start"},
        {"type": "http.response.start", "status": "200", "headers": []},
        {"type": "http.response.start", "status": 200, "headers": [(b"x-a", 1)]},
        {"type": "http.response.start", "status": 200, "headers": [("x-a", "str")]},
        {"type": "no.such.message"},
    ],
    ids=["body-before-start", "status-str", "header-value-int", "header-str", "unknown-type"],
)
def test_invalid_asgi_message_is_app_error_500(serve: Any, message: dict[str, Any]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(message)
        await send({"type": "http.response.body", "body": b"never"})

    with capture_log() as records:
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 500
            assert b"never" not in resp.body
            wait_for(lambda: [r for r in records if r.levelno >= 40])


@pytest.mark.parametrize("status", [100, 103, 101])
def test_informational_status_from_app_is_app_error(serve: Any, status: int) -> None:
    # http.response.start starts the final response; a 1xx there would leave the client
    # waiting for a final response that never comes.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with capture_log():
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_final_response(timeout=2)
            assert resp.status == 500


BAD_HEADERS = {
    "crlf-in-value": (b"x-a", b"ok\r\nX-Injected: yes"),
    "lf-in-value": (b"x-a", b"ok\nX-Injected: yes"),
    "cr-in-value": (b"x-a", b"ok\rX-Injected: yes"),
    "nul-in-value": (b"x-a", b"ok\x00X-Injected"),
    "crlf-in-name": (b"x-a\r\nx-injected", b"yes"),
    "space-in-name": (b"x injected", b"yes"),
    "colon-in-name": (b"x-injected:", b"yes"),
    "empty-name": (b"", b"x-injected"),
    "nul-in-name": (b"x-injected\x00", b"yes"),
}


@pytest.mark.parametrize("header", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_invalid_response_header_is_app_error(serve: Any, header: tuple[bytes, bytes]) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [header, (b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"oops"})

    with capture_log() as records:
        with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(headers=[("Connection", "close")]))
            data = conn.read_until_close()
            wait_for(lambda: [r for r in records if r.levelno >= 40])
    assert b"injected" not in data.lower()
    responses = parse_responses(data)
    assert [r.status for r in responses] == [500], data
    assert b"oops" not in data


def test_error_logged_once_per_request(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise Boom(scope["path"])

    with capture_log() as records:
        with serve(app) as srv:
            for i in range(3):
                with Conn.open(srv.host, srv.port) as conn:
                    conn.send(build_request(target=f"/e{i}"))
                    assert conn.read_response().status == 500
            wait_for(lambda: len(error_tracebacks(records)) >= 3)
    assert len(error_tracebacks(records)) == 3
