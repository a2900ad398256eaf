"""HTTP/2 retiring and shutdown (issue 12, item 5): GOAWAY with the last stream id, streams in
flight finish, new ones go to other workers; no failed request on SIGHUP, on recycling and on
SIGTERM with h2 clients, standalone (the supervisor) and in process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from hyperframe.frame import PingFrame, SettingsFrame

from tests.conftest import run_server, wait_for
from tests.h2_client import H2Client, H2Response, get
from tests.test_supervisor_cli import KeepAliveLoad, Served, served  # noqa: F401  (fixture)


def test_retire_finishes_streams_in_flight_then_goaway() -> None:
    release = threading.Event()
    started: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started.append(scope["path"])
        while scope["path"] == "/slow" and not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    with run_server(app) as srv:
        idle = H2Client(srv.host, srv.port)
        assert get(idle).status == 200
        busy = H2Client(srv.host, srv.port)
        slow = busy.request(path="/slow")
        wait_for(lambda: "/slow" in started)
        srv.server.retire()
        # The idle connection is told at once (last stream 1: the one it had).
        idle.read(lambda: idle.goaway is not None)
        assert (idle.goaway.error_code, idle.goaway.last_stream_id) == (0, 1)
        idle.close()
        # The busy one finishes its stream first, then hears GOAWAY naming it.
        release.set()
        response = busy.response(slow)
        assert (response.status, response.body) == (200, b"/slow")
        busy.read(lambda: busy.goaway is not None)
        assert (busy.goaway.error_code, busy.goaway.last_stream_id) == (0, slow)
        busy.close()


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def test_connection_accepted_before_a_retirement_is_served_then_told_goaway(serve: Any) -> None:
    """A connection accepted just before the server stops accepting sends its preface, SETTINGS
    and a request together (as httpx does): the request is answered and GOAWAY is the last
    frame, after the ACK of the client's SETTINGS. Before, GOAWAY (last stream 0) went first
    and the ACK after it, which h2 clients take for a protocol error."""
    with serve(hello) as srv:
        client = H2Client(srv.host, srv.port, send_preface=False)
        state = srv.server.state
        wait_for(lambda: len(state.connections) == 1)
        state.loop.call_soon_threadsafe(srv.server.hold)
        wait_for(lambda: not state.accepting_requests)
        stream = client.request(path="/late")  # the preface, SETTINGS and HEADERS in one write
        response = client.response(stream)  # h2 raises here on a frame after GOAWAY
        assert (response.status, response.body) == (200, b"/late")
        client.read(lambda: client.goaway is not None)
        assert (client.goaway.error_code, client.goaway.last_stream_id) == (0, stream)
        client.close()


def test_no_frame_follows_goaway_when_the_client_speaks_after_it(serve: Any) -> None:
    """GOAWAY for a connection that sent only the preface (the header timeout); the client's
    SETTINGS and PING, sent before it read the GOAWAY, are not answered after it."""
    with serve(hello, timeout_request_header=0.3) as srv:
        client = H2Client(srv.host, srv.port, send_preface=False)
        client.send_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        client.h2.initiate_connection()
        client.h2.data_to_send()  # the client's own preface and SETTINGS: sent below, late
        client.read(lambda: client.goaway is not None)
        client.send_raw(SettingsFrame(0).serialize() + PingFrame(0, opaque_data=b"12345678").serialize())
        client.read(lambda: False, timeout=10)  # until the server closes: h2 raises on any frame
        assert client.closed and client.goaway.last_stream_id == 0


def test_hup_with_h2_clients_fails_no_request(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", env={"APP_IMPORT_DELAY": "0.5"})
    old = server.serving_pids(2)
    load = KeepAliveLoad(server.url, http2=True)
    wait_for(lambda: load.ok > 50)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("Reload complete")
    wait_for(lambda: server.workers().isdisjoint(old))
    answered = load.ok
    wait_for(lambda: load.ok > answered + 50)
    load.stop()
    assert load.failures == []
    assert server.stop() == 0


def test_recycling_with_h2_clients_fails_no_request(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", "--max-requests", "50", "--max-requests-jitter", "10")
    first = server.serving_pids(2)
    load = KeepAliveLoad(server.url, http2=True)
    wait_for(lambda: len(load.pids - first) >= 3, timeout=20)
    load.stop()
    assert load.failures == []


def test_sigterm_finishes_the_h2_request_in_flight(served: Callable[..., Served]) -> None:
    server = served("--workers", "1")
    server.serving_pids(1)
    result: list[Any] = []

    def slow_request() -> None:
        with httpx.Client(http1=False, http2=True, timeout=10) as client:
            result.append(client.get(server.url + "sleep"))

    thread = threading.Thread(target=slow_request)
    thread.start()
    sleeping = server.import_log.with_name(server.import_log.name + ".sleeping")
    wait_for(sleeping.exists)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(15)
    assert result and result[0].status_code == 200 and result[0].http_version == "HTTP/2"
    assert server.proc.wait(15) == 0


def test_a_connection_never_idle_is_told_goaway_once_the_streams_taken_are_done() -> None:
    """A connection that always has a stream in flight (a client multiplexing its requests) is
    told GOAWAY as soon as the streams it had opened when the retirement began are answered:
    a stream opened after that is not started, and the GOAWAY names the last one taken, so
    the client sends it elsewhere (httpx retries it on a new connection). Before, such a
    connection was served on, new streams and all, until it had nothing in flight or the
    keep-alive timeout after the retirement had passed (30 s here)."""
    gates = {"/first": threading.Event(), "/later": threading.Event()}
    started: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started.append(scope["path"])
        gate = gates.get(scope["path"])
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    with run_server(app, timeout_keep_alive=30) as srv, contextlib.ExitStack() as release:
        release.callback(lambda: [gate.set() for gate in gates.values()])  # the server can stop
        client = H2Client(srv.host, srv.port)
        first = client.request(path="/first")
        wait_for(lambda: "/first" in started)
        (conn,) = list(srv.server.state.connections)
        srv.server.retire()
        wait_for(lambda: conn.retiring)
        later = client.request(path="/later")  # sent before the client has heard of it
        gates["/first"].set()
        response = client.response(first)
        assert (response.status, response.body) == (200, b"/first")
        client.read(lambda: client.goaway is not None, timeout=5)
        assert (client.goaway.error_code, client.goaway.last_stream_id) == (0, first) and later > first
        assert client.wait_closed(timeout=10)  # the linger: the server closes after its GOAWAY
        assert started == ["/first"] and client.responses[later] == H2Response()


def ignored_after(exc: BaseException) -> float:
    """The last stream id of the server's GOAWAY (NO_ERROR) that httpx's error carries, after
    which the server took no stream; infinity for any other error."""
    cause = exc.__cause__
    event = cause.args[0] if cause is not None and cause.args else None
    if isinstance(event, ConnectionTerminated) and event.error_code == ErrorCodes.NO_ERROR:
        return event.last_stream_id
    return float("inf")


def test_hup_with_h2_clients_multiplexing_fails_no_request(served: Callable[..., Served]) -> None:
    """Two tasks sharing one httpx HTTP/2 client (one connection), each sending 1 s requests,
    half a second apart, so that a stream is always in flight: after SIGHUP the old worker's
    connection is told GOAWAY once the streams it took are answered, httpx sends the later
    ones to the new workers, and none fails. Before, a connection never idle was told only at
    the keep-alive timeout (20 s here), and httpx failed the streams in flight then. (A stream
    httpx opens as the GOAWAY arrives, above its last stream id, it fails instead of retrying:
    that one the server never took, and the task sends it again.)"""
    server = served("--workers", "2", "--timeout-keep-alive", "20")
    old = server.serving_pids(2)
    failures: list[str] = []
    answered: list[int] = []
    raced: list[int] = []

    async def load() -> None:
        stop = asyncio.Event()

        async def run(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                opened: list[int] = []

                async def trace(event: str, info: dict[str, Any]) -> None:
                    if event == "http2.send_request_headers.started":
                        opened.append(info["stream_id"])

                try:
                    response = await client.get(server.url + "sleep", extensions={"trace": trace})
                    assert response.status_code == 200, response.status_code
                    answered.append(int(response.text))
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    if opened and opened[-1] > ignored_after(exc):
                        # A stream opened as our GOAWAY arrived, which the GOAWAY says we
                        # ignored: httpcore raises for it instead of retrying it (it retries
                        # only a stream it was already waiting on). Not a request we lost.
                        raced.append(opened[-1])
                        continue
                    failures.append(f"stream {opened}: {exc!r}")

        async def until(condition: Callable[[], bool], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not condition() and not failures:
                assert time.monotonic() < deadline, "timed out"
                await asyncio.sleep(0.05)

        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
            first = asyncio.create_task(run(client))
            await asyncio.sleep(0.5)  # the second half a second later: one is always in flight
            second = asyncio.create_task(run(client))
            await until(lambda: len(answered) >= 2, 10)
            server.proc.send_signal(signal.SIGHUP)
            await until(lambda: "Reload complete" in server.log and server.workers().isdisjoint(old), 10)
            count = len(answered)
            await until(lambda: len(answered) >= count + 4, 10)
            stop.set()
            await asyncio.gather(first, second)

    asyncio.run(load())
    assert failures == []
    assert set(answered) - old  # the new workers answered too
    assert server.stop() == 0
