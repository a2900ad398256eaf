"""Timeouts against slow and idle clients (issue 2: "Limits, timeouts and hostile clients").

Short settings (0.3-0.5 s) keep the tests fast; the upper bounds are generous because the
machine running the suite may be busy. A client that is cut off may get a 408 or nothing, but
never a response from the app.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from typing import Any

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, parse_responses, read_body, respond
from uvworker.protocols.connection import CLOSED

MiB = 1024 * 1024


class CountingApp:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        try:
            body = await read_body(receive)
        except ConnectionError:
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        await respond(send, body=b"ok:" + body)


def assert_cut_off(data: bytes) -> None:
    """Whatever a timed-out client received: nothing, or one 408."""
    if data:
        assert [r.status for r in parse_responses(data)] == [408], data


def trickle_until_closed(conn: Conn, data: bytes, interval: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` one byte every ``interval`` seconds until the server closes (or answers).
    Returns (seconds until closed, bytes received)."""
    started = time.monotonic()
    received = b""
    for byte in data:
        if time.monotonic() - started > limit:
            raise AssertionError(f"server still reading a trickled request after {limit} s")
        try:
            conn.sock.send(bytes([byte]))
        except OSError:
            break
        readable, _, _ = select.select([conn.sock], [], [], interval)  # the deliberate trickle pace
        if readable:
            received = conn.read_until_close(timeout=2.0)
            break
    else:
        raise AssertionError("the whole trickled request was accepted")
    return time.monotonic() - started, received


def test_fresh_silent_connection_closed_after_header_timeout(serve: Any) -> None:
    app = CountingApp()
    with serve(app, timeout_request_header=0.4, timeout_keep_alive=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            started = time.monotonic()
            data = conn.read_until_close(timeout=3.0)
            elapsed = time.monotonic() - started
        assert_cut_off(data)
        assert 0.3 <= elapsed < 2.5, elapsed
    assert app.calls == 0


def test_trickled_header_block_is_cut_off(serve: Any) -> None:
    app = CountingApp()
    request = build_request(headers=[(f"X-Slow-{i}", "v" * 20) for i in range(40)])
    with serve(app, timeout_request_header=0.5, timeout_keep_alive=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            elapsed, data = trickle_until_closed(conn, request, interval=0.02, limit=4.0)
        assert_cut_off(data)
        # Each byte arrives well within any idle timeout; only a whole-header deadline stops it.
        assert 0.4 <= elapsed < 2.5, elapsed
    assert app.calls == 0


def test_header_timeout_applies_to_later_requests_too(serve: Any) -> None:
    app = CountingApp()
    with serve(app, timeout_request_header=0.5, timeout_keep_alive=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            assert conn.read_response().body == b"ok:"
            elapsed, data = trickle_until_closed(conn, build_request(target="/" + "p" * 400), 0.02, 4.0)
        assert_cut_off(data)
        assert elapsed < 2.5, elapsed
    assert app.calls == 1


def test_idle_keep_alive_connection_closed(serve: Any) -> None:
    with serve(CountingApp(), timeout_keep_alive=0.5, timeout_request_header=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            assert conn.read_response().status == 200
            done = time.monotonic()
            data = conn.read_until_close(timeout=3.0)
            elapsed = time.monotonic() - done
        assert data == b""  # nothing is sent on an idle connection, not even a 408
        assert 0.35 <= elapsed < 2.5, elapsed


def test_keep_alive_timer_restarts_with_each_request(serve: Any) -> None:
    # Wide margins (1.5 s timeout, 0.3 s gaps): a busy CI machine may delay the client's reads.
    with serve(CountingApp(), timeout_keep_alive=1.5, timeout_request_header=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            started = time.monotonic()
            for _ in range(6):  # 6 x 0.3 s of idleness, each shorter than the keep-alive timeout
                conn.send(build_request())
                assert conn.read_response().status == 200
                readable, _, _ = select.select([conn.sock], [], [], 0.3)  # deliberate idle gap
                assert not readable, "connection closed before its keep-alive timeout"
            assert time.monotonic() - started > 1.8  # longer than one keep-alive timeout
            conn.send(build_request())
            assert conn.read_response().status == 200


def test_keep_alive_timeout_is_whole_after_the_app_held_the_loop_up(serve: Any) -> None:
    """The keep-alive deadline counts from the sweep's last tick (one for every connection going
    idle until the next): after an app that blocked the loop for longer than the timeout, the
    connection still gets the whole timeout from its response, not a deadline from before the
    block, which the next sweep would find past (it did, before the sweep refreshed it)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/block":
            time.sleep(2.0)  # holds the whole loop: no sweep meanwhile
        await respond(send, body=b"ok")

    with serve(app, timeout_keep_alive=1.5, timeout_request_header=5) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/block"))
        assert conn.read_response(timeout=10).body == b"ok"
        readable, _, _ = select.select([conn.sock], [], [], 0.4)  # a few sweeps
        assert not readable, "connection closed before its keep-alive timeout"
        conn.send(build_request())
        assert conn.read_response().body == b"ok"


def test_slow_app_is_not_cut_off_by_client_timeouts(serve: Any) -> None:
    # Timeouts govern what the server waits for from the client, never the app's own time.
    app = CountingApp(delay=0.8)
    settings = {"timeout_keep_alive": 0.3, "timeout_request_header": 0.3, "timeout_request_body": 0.3}
    with serve(app, **settings) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", body=b"data"))
        resp = conn.read_response(timeout=5)
        assert (resp.status, resp.body) == (200, b"ok:data")


def test_stalled_body_is_cut_off(serve: Any) -> None:
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            body = await read_body(receive)
        except ConnectionError:
            outcome.append("disconnect")
            return
        outcome.append("body")
        await respond(send, body=body)

    with serve(app, timeout_request_body=0.5, timeout_request_header=5, timeout_keep_alive=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("POST", headers=[("Content-Length", "1000")]) + b"x" * 10)
            started = time.monotonic()
            data = conn.read_until_close(timeout=3.0)
            elapsed = time.monotonic() - started
        assert_cut_off(data)
        assert 0.35 <= elapsed < 2.5, elapsed
        wait_for(lambda: outcome)
    assert outcome == ["disconnect"]


def test_crawling_body_is_cut_off(serve: Any) -> None:
    """A body that keeps trickling (each byte well inside timeout_request_body) is cut off
    because its rate stays under min_request_body_rate."""
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            body = await read_body(receive)
        except ConnectionError:
            release.set()
            return
        await respond(send, body=body)

    settings = {"timeout_request_body": 0.5, "min_request_body_rate": 1000, "timeout_request_header": 5}
    with serve(app, **settings) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Content-Length", "100000")]))
        elapsed, data = trickle_until_closed(conn, b"b" * 100_000, interval=0.05, limit=5.0)
        assert_cut_off(data)
        assert elapsed < 4.0, elapsed
        wait_for(release.is_set)


def test_slow_clients_do_not_block_normal_clients(serve: Any) -> None:
    with serve(CountingApp(), timeout_request_header=5) as srv:
        slow = [Conn.open(srv.host, srv.port) for _ in range(200)]
        try:
            for conn in slow:
                conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slo")  # never finished
            started = time.monotonic()
            for _ in range(20):
                with Conn.open(srv.host, srv.port) as conn:
                    conn.send(build_request(headers=[("Connection", "close")]))
                    assert conn.read_response().status == 200
            assert time.monotonic() - started < 2.0
        finally:
            for conn in slow:
                conn.close()


def test_client_that_never_reads_its_responses_is_cut_off(serve: Any) -> None:
    """Pipelined requests, responses never read: once the server has stopped answering (write
    backpressure), the connection is dropped at the send timeout, not kept forever with its
    unsent responses."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=b"r" * 4096)

    settings = {"timeout_keep_alive": 0.3, "timeout_send": 0.5}
    with serve(app, **settings) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536, sndbuf=65536) as conn:
        conn.sock.settimeout(0.5)
        blob = build_request() * 500
        sent = 0
        stalled = 0
        # Until our sends stall because the server stopped reading, its writes paused (on a busy
        # machine a send may also stall while the server waits for a CPU: go on then).
        while sent < 200_000 and stalled < 20:
            try:
                conn.sock.sendall(blob)
                sent += 500
            except TimeoutError:
                if any(c.write_paused for c in list(srv.server.state.connections)):
                    break
                stalled += 1
            except ConnectionError:
                break
        # Without reading anything, the server lets go of the connection (and its buffers).
        wait_for(lambda: not srv.server.state.connections, timeout=10)
        conn.sock.settimeout(10)
        received = 0
        try:
            while data := conn.sock.recv(1 << 20):  # what was already sent, then the end
                received += len(data)
        except ConnectionResetError:
            pass
    assert sent >= 1000, "the client's sends never stalled"
    # Cut off: far fewer responses than requests sent (each response is over 4 KiB).
    assert received < 8 * MiB < sent * 4096, (received, sent)


def test_big_response_read_late_is_not_cut_by_the_keep_alive_timeout(serve: Any) -> None:
    """A response sent in one piece, bigger than the socket buffers hold, to a client that
    starts reading it only after the keep-alive timeout: a connection whose response is still
    going out is not idle, so the client gets it whole (the send timeout bounds a client that
    takes nothing) and the connection serves a next request. Before, the keep-alive timeout
    ran from the app's last send() and cut the response (as it cut a client on a slow link
    downloading a big response), where uvicorn delivers it."""
    body = b"b" * (8 * MiB)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=body)

    with serve(app, timeout_keep_alive=0.3, timeout_send=30) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
        conn.send(build_request())
        wait_for(lambda: any(c.write_paused for c in list(srv.server.state.connections)))
        select.select([], [], [], 1.0)  # deliberately past the keep-alive timeout, reading nothing
        response = conn.read_response(timeout=30)
        assert (response.status, len(response.body)) == (200, len(body))
        conn.send(build_request())
        assert conn.read_response(timeout=30).status == 200


def test_slow_but_steady_body_survives_without_a_minimum_rate(serve: Any) -> None:
    """min_request_body_rate=0: the body deadline only bounds a stall, so a body whose pieces
    come every 0.2 s (inside a 0.5 s timeout) arrives whole, over several timeouts."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=await read_body(receive))

    settings = {"timeout_request_body": 0.5, "min_request_body_rate": 0, "timeout_request_header": 5}
    with serve(app, **settings) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("POST", headers=[("Content-Length", "8")]))
        for piece in (b"ab", b"cd", b"ef", b"gh"):
            select.select([conn.sock], [], [], 0.2)  # the deliberate pace, well inside the timeout
            conn.send(piece)
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"abcdefgh")


def test_client_that_stops_reading_a_streamed_response_is_cut_off(serve: Any) -> None:
    """timeout_send: the app streams, the client reads nothing; the server drops the connection
    and the app's send() stops waiting (it raises an OSError) instead of hanging forever."""
    outcome: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"s" * 65536, "more_body": True})
        except OSError as exc:
            outcome.append(exc)

    with serve(app, timeout_send=0.5) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
        conn.send(build_request())
        wait_for(lambda: outcome, timeout=10)
        wait_for(lambda: not srv.server.state.connections)


def test_closing_connection_whose_client_takes_nothing_is_dropped_at_the_send_timeout(serve: Any) -> None:
    """A response bigger than the socket buffers to a request that said Connection: close: the
    connection closes after it, and a close waits for the response to go out. A client that
    reads none of it is dropped at the send timeout; one that reads it gets it whole. Before, the first kept its connection and buffers for ever
    (--timeout-send did not apply once the connection was closing)."""
    body = b"c" * (8 * MiB)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=body)

    request = build_request(headers=[("Connection", "close")])
    with serve(app, timeout_send=2) as srv:
        with Conn.open(srv.host, srv.port, rcvbuf=65536) as idle, Conn.open(srv.host, srv.port, rcvbuf=65536) as late:
            idle.send(request)
            wait_for(lambda: len(srv.server.state.connections) == 2)
            late.send(request)
            wait_for(lambda: all(c.phase == CLOSED for c in list(srv.server.state.connections)))
            response = late.read_response(timeout=30)
            assert (response.status, len(response.body)) == (200, len(body))
            assert late.read_until_close(timeout=10) == b""
            wait_for(lambda: not srv.server.state.connections, timeout=15)  # the idle one too
