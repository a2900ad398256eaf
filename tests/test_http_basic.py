"""Keep-alive, pipelining, HTTP/1.0 and the headers the server adds (issue 2: HTTP/1.1)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import datetime, timezone
from typing import Any

import httpx

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, parse_responses, respond


async def echo_path_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with ``<path> <client port>``; /slow-N sleeps N hundredths of a second first."""
    assert scope["type"] == "http"
    if scope["path"].startswith("/slow-"):
        await asyncio.sleep(int(scope["path"][6:]) / 100)
    await respond(send, body=f"{scope['path']} {scope['client'][1]}".encode())


async def stream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """No Content-Length: the server chooses the framing."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part1-", "more_body": True})
    await send({"type": "http.response.body", "body": b"part2"})


def test_simple_get(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/hello"))
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body.startswith(b"/hello ")
        assert resp.get("content-length") == str(len(resp.body))
        assert resp.get("transfer-encoding") is None


def test_httpx_client(serve: Any) -> None:
    with serve(echo_path_app) as srv:
        r = httpx.get(srv.url + "/x?y=1", timeout=3)
        assert r.status_code == 200
        assert r.content.startswith(b"/x ")


def test_keep_alive_serves_several_requests_on_one_connection(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        local_port = conn.sock.getsockname()[1]
        for i in range(3):
            conn.send(build_request(target=f"/r{i}"))
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.body == f"/r{i} {local_port}".encode()
            assert not resp.has_token("connection", "close")
        conn.assert_open()


def test_pipelined_requests_answered_in_order(serve: Any) -> None:
    # The first request is the slowest: responses must still come back in request order.
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(
            build_request(target="/slow-20")
            + build_request(target="/slow-0")
            + build_request(target="/slow-10")
            + build_request(target="/last")
        )
        paths = [conn.read_response().body.split(b" ")[0] for _ in range(4)]
        assert paths == [b"/slow-20", b"/slow-0", b"/slow-10", b"/last"]
        conn.assert_open()


def test_pipelined_request_with_body_then_get(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await respond(send, body=scope["method"].encode() + b":" + body)

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(
            build_request("POST", "/a", body=b"hello")
            + build_request("POST", "/b", headers=[("Transfer-Encoding", "chunked")])
            + b"3\r\nabc\r\n0\r\n\r\n"
            + build_request("GET", "/c")
        )
        assert [conn.read_response().body for _ in range(3)] == [b"POST:hello", b"POST:abc", b"GET:"]


def test_malformed_request_pipelined_after_valid_one(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/slow-10") + b"THIS IS NOT HTTP\r\n\r\n")
        responses = parse_responses(conn.read_until_close())
        assert [r.status for r in responses] == [200, 400]
        assert responses[0].body.startswith(b"/slow-10 ")
        assert responses[1].has_token("connection", "close")


def test_http10_without_keep_alive_closes(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"GET /old HTTP/1.0\r\n\r\n")  # no Host: fine for 1.0
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body.startswith(b"/old ")
        assert not resp.has_token("connection", "keep-alive")
        conn.read_until_close()


def test_http10_keep_alive_is_honoured(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        for i in range(2):
            conn.send(f"GET /ka{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.body.startswith(f"/ka{i} ".encode())
            assert resp.has_token("connection", "keep-alive")
        conn.assert_open()


def test_connection_close_from_client_is_honoured(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(headers=[("Connection", "close")]))
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.has_token("connection", "close")
        assert conn.read_until_close() == b""


def test_connection_close_from_app_closes_after_response(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=b"bye", headers=[(b"connection", b"close")])

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request() + build_request(target="/never"))
        resp = conn.read_response()
        assert resp.body == b"bye"
        assert conn.read_until_close() == b""


def test_date_and_server_headers_present(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.get("server")
        date = resp.get("date")
        assert date is not None
        sent = email.utils.parsedate_to_datetime(date)
        assert date.endswith(" GMT")
        # The Date header may be cached for a second; allow a little more for a loaded machine.
        assert abs((datetime.now(timezone.utc) - sent).total_seconds()) < 5
        assert len(resp.get_all("date")) == 1 and len(resp.get_all("server")) == 1


def test_date_header_is_refreshed(serve: Any) -> None:
    with serve(echo_path_app) as srv, Conn.open(srv.host, srv.port) as conn:

        def date() -> str | None:
            conn.send(build_request())
            return conn.read_response().get("date")

        first = date()
        wait_for(lambda: date() != first, timeout=3, interval=0.05)


def test_no_server_and_no_date_header(serve: Any) -> None:
    with serve(echo_path_app, server_header=False, date_header=False) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.get("server") is None
            assert resp.get("date") is None


def test_app_headers_replace_server_and_date_defaults(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=b"x", headers=[(b"server", b"my-app"), (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT")])

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.get_all("server") == ["my-app"]
        assert resp.get_all("date") == ["Thu, 01 Jan 1970 00:00:00 GMT"]


def test_default_headers_from_setting(serve: Any) -> None:
    with serve(echo_path_app, headers=["X-A:1", "X-Other: two words"]) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.get("x-a") == "1"
            assert resp.get("x-other") == "two words"


def test_many_sequential_connections(serve: Any) -> None:
    with serve(echo_path_app) as srv:
        started = time.monotonic()
        for i in range(20):
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(build_request(target=f"/{i}", headers=[("Connection", "close")]))
                assert conn.read_response().body.startswith(f"/{i} ".encode())
        assert time.monotonic() - started < 5
        assert srv.server.requests_served >= 20


def test_each_request_runs_in_a_task_of_its_own_made_by_the_loops_task_factory(serve: Any) -> None:
    """current_task() in the app is a real asyncio Task, a new one per request (anyio and the
    cancellation on disconnect need it); once the app sets a task factory on the loop, the
    factory makes them (the server builds request tasks itself only when there is none)."""
    tasks: list[Any] = []
    made: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        made.append(task)
        return task

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        tasks.append(asyncio.current_task())
        if scope["path"] == "/factory":
            asyncio.get_running_loop().set_task_factory(factory)
        elif scope["path"] == "/reset":
            asyncio.get_running_loop().set_task_factory(None)
        await respond(send, body=b"ok")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for target in ("/", "/factory", "/made", "/reset"):
            conn.send(build_request(target=target))
            assert conn.read_response().body == b"ok"
    assert all(isinstance(task, asyncio.Task) for task in tasks)
    assert len({id(task) for task in tasks}) == 4
    assert made == tasks[2:]
