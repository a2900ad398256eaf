"""HTTP/2 defences (issue 12, item 4), each checked against what a client sees: rapid reset
(CVE-2023-44487), CONTINUATION flood (CVE-2024-27316), SETTINGS / PING / empty-DATA floods,
--http2-max-concurrent-streams, the header list size, the keep-alive and header timeouts."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.conftest import run_server
from tests.h2_client import H2Client, get
from tests.test_tls import make_cert

calls: list[str] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    calls.append(scope["path"])
    if scope["path"] == "/body":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def cut_off(client: H2Client) -> bool:
    """The server ended the connection with GOAWAY ENHANCE_YOUR_CALM (and closed it)."""
    client.wait_closed(timeout=10)
    return client.goaway is not None and client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_is_cut_off() -> None:
    calls.clear()
    with run_server(app) as srv:
        client = H2Client(srv.host, srv.port)
        for i in range(5000):
            if i % 100 == 0:  # take the server's frames as a normal client would
                try:
                    client.read(lambda: False, timeout=0.001)
                except AssertionError:
                    pass
            if client.closed or client.goaway is not None:
                break
            stream = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream, [(b":method", b"GET"), (b":path", b"/reset"), (b":scheme", b"http"),
                                            (b":authority", b"x")], end_stream=True)
            client.h2.reset_stream(stream, ErrorCodes.CANCEL)
            client.flush()
        assert cut_off(client)
        assert len(calls) < 1000  # the work it cost is bounded, far below what it asked for
        client.close()
        with H2Client(srv.host, srv.port) as other:  # others are served as before
            assert get(other).status == 200


@pytest.mark.parametrize("frame", ["settings", "ping", "empty-data"])
def test_control_frame_floods_are_cut_off(frame: str) -> None:
    with run_server(app) as srv:
        client = H2Client(srv.host, srv.port)
        stream = client.request("POST", "/body", end=False) if frame == "empty-data" else 0
        for i in range(3000):
            if client.closed or client.goaway is not None:
                break
            if frame == "settings":
                client.h2.update_settings({4: 65535})  # INITIAL_WINDOW_SIZE, unchanged
            elif frame == "ping":
                client.h2.ping(b"%08d" % i)
            else:
                client.h2.send_data(stream, b"")
            client.flush()
            if i % 100 == 0:  # take the server's answers (ACKs) as a normal client would
                try:
                    client.read(lambda: False, timeout=0.001)
                except AssertionError:
                    pass
        assert cut_off(client)
        client.close()


def test_a_few_control_frames_are_fine() -> None:
    with run_server(app) as srv, H2Client(srv.host, srv.port) as client:
        for i in range(50):
            client.h2.ping(b"%08d" % i)
            client.h2.update_settings({4: 65535})
            assert get(client).status == 200
        assert client.goaway is None


def _header_block(size: int) -> bytes:
    head = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")]
    return Encoder().encode(head + [(b"x-filler-%d" % i, b"v" * 900) for i in range(size // 1000)])


def test_continuation_flood_is_bounded_by_the_header_limits() -> None:
    """A header block that never ends is cut off once it passes the header limits, before its
    end (h2 alone waits for up to 64 CONTINUATION frames of any size)."""
    with run_server(app, limit_request_fields=10, limit_request_field_size=1000) as srv:
        client = H2Client(srv.host, srv.port)
        block = _header_block(40 * 16384)
        first = HeadersFrame(1, data=block[:16000], flags=["END_STREAM"])
        client.send_raw(first.serialize())
        for start in range(16000, 16000 + 30 * 16000, 16000):  # 30 frames: under h2's own 64
            if client.closed:
                break
            client.send_raw(ContinuationFrame(1, data=block[start : start + 16000]).serialize())
        assert cut_off(client)
        client.close()


def test_header_list_size() -> None:
    with run_server(app, limit_request_fields=10, limit_request_field_size=1000) as srv:
        client = H2Client(srv.host, srv.port)
        client.read(lambda: client.h2.remote_settings.max_header_list_size is not None)
        advertised = client.h2.remote_settings.max_header_list_size
        assert advertised == srv.server.state.h1.limits.head
        assert get(client, headers=[("x-small", "v")]).status == 200
        r = get(client, headers=[("x-big", "v" * 2000)])  # one field beyond its limit
        assert r.status == 431
        client.close()
        client = H2Client(srv.host, srv.port)  # a header list beyond the advertised size
        client.request(headers=[(f"x-{i}", "v" * 900) for i in range(advertised // 900 + 2)])
        assert cut_off(client)
        client.close()


def test_max_concurrent_streams() -> None:
    release = threading.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with run_server(slow, http2_max_concurrent_streams=2) as srv:
        client = H2Client(srv.host, srv.port)
        # Sent at once, before the client has read our SETTINGS: the third is refused.
        streams = [client.request(path=f"/{i}") for i in range(3)]
        third = client.response(streams[2])
        assert third.reset == ErrorCodes.REFUSED_STREAM
        assert client.h2.remote_settings.max_concurrent_streams == 2
        release.set()
        assert [client.response(s).status for s in streams[:2]] == [200, 200]
        assert get(client).status == 200  # room again
        client.close()


def test_idle_connection_gets_goaway_after_keep_alive_timeout() -> None:
    with run_server(app, timeout_keep_alive=0.5) as srv, H2Client(srv.host, srv.port) as client:
        assert get(client).status == 200
        assert client.wait_closed(timeout=10)
        assert client.goaway is not None and client.goaway.error_code == 0
        assert client.goaway.last_stream_id == 1


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("h2def"))


def test_stalled_preface_is_cut_off_by_the_header_timeout(cert: tuple[Path, Path]) -> None:
    settings = {"timeout_request_header": 0.5, "timeout_keep_alive": 60}
    # TLS negotiated h2, then nothing: cut off (and the cleartext one that sent only the preface).
    with run_server(app, ssl_certfile=str(cert[0]), ssl_keyfile=str(cert[1]), **settings) as srv:
        context = ssl.create_default_context(cafile=str(cert[0]))
        context.set_alpn_protocols(["h2"])
        import socket

        with socket.create_connection((srv.host, srv.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == "h2"
                data = b""
                while True:  # the server's SETTINGS, then GOAWAY, then the close
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                assert b"\x07\x00\x00\x00\x00\x00" in data  # a GOAWAY frame (type 7, stream 0)
    with run_server(app, **settings) as srv, srv.connect(timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        while sock.recv(65536):
            pass  # returns once the server closes: bounded by the socket timeout
