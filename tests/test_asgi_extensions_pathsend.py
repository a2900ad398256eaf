"""http.response.pathsend on HTTP/1.1, as clients see it, on both parsers: os.sendfile on
plaintext, bounded pieces over TLS; Content-Length from the file when the app gave none; HEAD;
a client that leaves, or stops reading, in the middle of a file; memory flat for a 1 GiB file
(a sparse one, so the test writes nothing to disk); bytes counted in the access log.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, capture_log
from tests.test_asgi_extensions import curl, needs_curl
from tests.test_tls import make_cert

GIB = 1 << 30


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(300_000))
    return path


def pathsend_app(path: Path | str, headers: list[tuple[bytes, bytes]] | None = None, seen: list[Any] | None = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if seen is not None:
            seen.append(scope)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")] + (headers or [])})
        await send({"type": "http.response.pathsend", "path": str(path)})

    return app


def test_the_file_is_the_body_framed_by_its_size(serve: Any, data_file: Path) -> None:
    seen: list[Any] = []
    with serve(pathsend_app(data_file, seen=seen)) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):  # the connection is reused after a file
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.get("content-length") == "300000" and not resp.chunked
            assert resp.body == data_file.read_bytes()
        conn.assert_open()
    assert "http.response.pathsend" in seen[0]["extensions"]


def test_the_apps_content_length_must_match_the_file(serve: Any, data_file: Path) -> None:
    good = pathsend_app(data_file, [(b"content-length", b"300000")])
    with serve(good) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.get_all("content-length") == ["300000"] and resp.body == data_file.read_bytes()
    bad = pathsend_app(data_file, [(b"content-length", b"10")])
    with serve(bad) as srv, capture_log(), Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.status == 500 and resp.has_token("connection", "close")


def test_head_gets_the_length_and_no_body(serve: Any, data_file: Path) -> None:
    with serve(pathsend_app(data_file)) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request("HEAD"))
        resp = conn.read_response("HEAD")
        assert resp.status == 200 and resp.get("content-length") == "300000"
        conn.send(build_request())  # no body bytes were left behind the HEAD answer
        assert conn.read_response().body == data_file.read_bytes()


def test_http10_client(serve: Any, data_file: Path) -> None:
    seen: list[Any] = []
    with serve(pathsend_app(data_file, seen=seen)) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(version="1.0"))
        resp = conn.read_response()
        assert resp.get("content-length") == "300000" and resp.body == data_file.read_bytes()
    assert seen[0]["extensions"] == {"http.response.pathsend": {}}


@pytest.mark.parametrize("path", ["missing", "relative", "directory"])
def test_a_path_that_cannot_be_sent_is_a_500(serve: Any, tmp_path: Path, path: str) -> None:
    target = {"missing": tmp_path / "nope", "relative": "data.bin", "directory": tmp_path}[path]
    with serve(pathsend_app(target)) as srv, capture_log() as records, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().status == 500
    assert any(r.exc_info for r in records)


def test_pathsend_cannot_follow_body(serve: Any, data_file: Path) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.pathsend", "path": str(data_file)})

    with serve(app) as srv, capture_log() as records, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        data = conn.read_until_close()
        assert data.startswith(b"HTTP/1.1 200") and not data.endswith(b"0\r\n\r\n")  # cut, not completed
    assert any("Unexpected ASGI message 'http.response.pathsend'" in str(r.exc_info[1]) for r in records if r.exc_info)


def test_pathsend_then_trailers(serve: Any, data_file: Path) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.pathsend", "path": str(data_file)})
        await send({"type": "http.response.trailers", "headers": [(b"x-sha256", b"ok")]})

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(headers=[("TE", "trailers")]))
        resp = conn.read_response()
        assert resp.chunked and resp.body == data_file.read_bytes() and resp.trailers == [("x-sha256", "ok")]
        conn.assert_open()


def test_access_log_counts_the_file(serve: Any, data_file: Path) -> None:
    logger = logging.getLogger("uvworker.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with serve(pathsend_app(data_file), access_log=True, access_log_format="%(s)s %(B)s") as srv, \
                capture_log("uvworker.access") as records:
            assert httpx.get(srv.url + "/").content == data_file.read_bytes()
            wait_for(lambda: records)
    finally:
        logger.setLevel(level)
    assert records[0].getMessage() == "200 300000"


@needs_curl
def test_curl_downloads_the_file(serve: Any, data_file: Path, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    for settings, scheme in (({}, "http"), ({"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}, "https")):
        with serve(pathsend_app(data_file), **settings) as srv:
            out = curl("-k", "--http1.1", f"{scheme}://{srv.host}:{srv.port}/")
        assert out.returncode == 0 and out.stdout == data_file.read_bytes(), scheme


def test_over_tls(serve: Any, data_file: Path, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    with serve(pathsend_app(data_file), ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as srv:
        with httpx.Client(verify=False) as client:
            for _ in range(2):
                resp = client.get(f"https://{srv.host}:{srv.port}/")
                assert resp.headers["content-length"] == "300000" and resp.content == data_file.read_bytes()


# -- a big file: memory, a client that leaves, a client that stops reading --------------------------
@pytest.fixture
def sparse_gib(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.truncate(GIB)
    return path


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def download(sock: socket.socket | ssl.SSLSocket, expect: int) -> int:
    """Read one response to the end into one reused buffer; returns the body bytes."""
    sock.sendall(build_request())
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    head = b""
    while b"\r\n\r\n" not in head:
        n = sock.recv_into(buf)
        assert n, "closed before the head"
        head += bytes(view[:n])
    head, _, rest = head.partition(b"\r\n\r\n")
    assert b"content-length: %d" % expect in head, head
    got = len(rest)
    while got < expect:
        n = sock.recv_into(buf)
        assert n, f"closed after {got} of {expect} bytes"
        got += n
    return got


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_gib_file_keeps_memory_flat(serve: Any, sparse_gib: Path, cert: tuple[Path, Path], tls: bool) -> None:
    settings: dict[str, Any] = {}
    if tls:
        settings = {"ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1])}
    with serve(pathsend_app(sparse_gib), **settings) as srv:
        sock: Any = socket.create_connection((srv.host, srv.port), timeout=30)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        with sock:
            peak_rss_reset()
            before = peak_rss()
            start = time.monotonic()
            assert download(sock, GIB) == GIB
            elapsed = time.monotonic() - start
            grown = peak_rss() - before
    print(f"1 GiB over {'TLS' if tls else 'plaintext'}: {elapsed:.1f} s, peak RSS +{grown / 2**20:.1f} MiB")
    assert grown < 32 * 2**20  # server and client share this process: both stay flat


def test_a_client_that_leaves_mid_file(serve: Any, sparse_gib: Path, data_file: Path) -> None:
    done: list[int] = []
    paths = iter([sparse_gib, data_file])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await pathsend_app(next(paths))(scope, receive, send)

    with serve(app) as srv:
        srv.server.state.request_hooks.append(lambda record: done.append(record.bytes_sent))
        with Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
            conn.send(build_request())
            conn.read_head()
            conn.read_exact(100_000, time.monotonic() + 5)
        wait_for(lambda: done)  # the response is over, the connection gone
        wait_for(lambda: not srv.server.state.connections)
        assert 100_000 <= done[0] < GIB
        assert httpx.get(srv.url + "/").content == data_file.read_bytes()  # and the server goes on


def test_a_client_that_stops_reading_is_dropped_by_timeout_send(serve: Any, sparse_gib: Path) -> None:
    with serve(pathsend_app(sparse_gib), timeout_send=0.5) as srv:
        with Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
            conn.send(build_request())
            conn.read_head()
            wait_for(lambda: not srv.server.state.connections, timeout=10)


def test_sendfile_on_the_asyncio_loop(serve: Any, tmp_path: Path) -> None:
    path = tmp_path / "mid.bin"
    path.write_bytes(os.urandom(5_000_000))  # more than a socket buffer: sendfile waits to write
    with serve(pathsend_app(path), loop="asyncio") as srv, httpx.Client() as client:
        for _ in range(2):
            assert client.get(srv.url + "/").content == path.read_bytes()
