"""HTTP/2 flow control both ways (issue 12, item 3): a stream's window is reopened only as its app
reads (memory bounded per stream and per connection), the app's send() waits while the peer's
window is closed, and a peer that never opens its window is dropped by --timeout-send."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.conftest import run_server, wait_for
from tests.h2_client import WINDOW, H2Client
from uvworker.protocols.h2 import CONNECTION_WINDOW, STREAM_WINDOW


def test_window_not_reopened_while_the_app_does_not_read() -> None:
    reading = threading.Event()
    sizes: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while not reading.is_set():
            await asyncio.sleep(0.01)
        size = 0
        while True:
            message = await receive()
            size += len(message["body"])
            if not message["more_body"]:
                break
        sizes.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % size})

    body = b"x" * (4 * 1024 * 1024)
    with run_server(app) as srv:
        client = H2Client(srv.host, srv.port)
        stream = client.request("POST", "/", body=None, end=False)
        sent = 0

        def send_what_fits() -> int:
            window = client.h2.local_flow_control_window(stream)
            if window and sent < len(body):
                client.send_body(stream, body[sent : sent + window], end=False)
            return window

        # Send whatever the windows allow, while reading the server's frames (its SETTINGS
        # raise the stream window to STREAM_WINDOW); then nothing more opens.
        for _ in range(50):
            sent += send_what_fits()
            try:
                client.read(lambda: client.h2.local_flow_control_window(stream) > 0, timeout=0.05)
            except AssertionError:
                pass
        assert client.h2.local_flow_control_window(stream) == 0
        assert STREAM_WINDOW // 2 <= sent <= STREAM_WINDOW, sent  # the server holds one window at most
        reading.set()  # the app reads: the window reopens and the whole body goes through
        while sent < len(body):
            client.read(lambda: client.h2.local_flow_control_window(stream) > 0, timeout=5)
            sent += send_what_fits()
        client.send_body(stream, b"", end=True)
        response = client.response(stream)
        assert (response.status, response.body) == (200, b"%d" % len(body))
        client.close()


def test_connection_window_bounds_streams_together() -> None:
    """Many streams whose apps do not read hold at most CONNECTION_WINDOW together."""
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with run_server(app) as srv:
        client = H2Client(srv.host, srv.port)
        client.read(lambda: client.h2.remote_settings.initial_window_size == STREAM_WINDOW)
        streams = [client.request("POST", "/", end=False) for _ in range(8)]
        sent = 0
        for _ in range(20):
            for stream in streams:
                window = client.h2.local_flow_control_window(stream)
                if window:
                    client.send_body(stream, b"y" * window, end=False)
                    sent += window
            try:
                client.read(lambda: False, timeout=0.05)
            except AssertionError:
                pass
        assert sent <= CONNECTION_WINDOW, sent
        assert client.h2.outbound_flow_control_window == 0
        release.set()
        for stream in streams:
            assert client.response(stream).status == 200
        client.close()


def test_send_waits_for_the_peer_window_and_a_closed_one_is_dropped() -> None:
    progress: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(64):
            await send({"type": "http.response.body", "body": b"z" * 16384, "more_body": True})
            progress.append(i)
        await send({"type": "http.response.body", "body": b""})

    with run_server(app, timeout_send=1.0) as srv:
        # A client that reads: everything arrives.
        client = H2Client(srv.host, srv.port)
        response = client.response(client.request())
        assert len(response.body) == 64 * 16384
        client.close()
        progress.clear()
        # A client that opens no window: send() waits (the app does not run ahead)...
        client = H2Client(srv.host, srv.port, settings={WINDOW: 1024}, auto_window=False)
        client.request()
        client.read(lambda: len(progress) > 0 or client.closed, timeout=5)
        held = len(progress)
        assert held < 8, held  # a piece or two may be queued, not the whole response
        # ... and the client is dropped once timeout_send passes without progress.
        assert client.wait_closed(timeout=10)
        assert client.goaway is None  # dropped, not closed gracefully
        assert len(progress) < 8
        client.close()
        wait_for(lambda: srv.server.active_requests == 0)
