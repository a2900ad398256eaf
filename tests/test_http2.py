"""HTTP/2 serving (issue 12, items 1-2): h2c by prior knowledge on the HTTP/1.1 port, h2 by ALPN
over TLS, the same ASGI cycle and scope; checked with clients we did not write (httpx, curl,
h2load) and with the h2 package's client side (tests/h2_client.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded

from tests.conftest import run_server, wait_for
from tests.h2_client import WINDOW, H2Client, H2Response, get
from tests.http_client import Conn, build_request
from tests.test_tls import make_cert
from uvworker.proxy import V2_SIGNATURE as PROXY_V2_SIGNATURE

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _curl_has_http2() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    out = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    return "HTTP2" in out


needs_curl = pytest.mark.skipif(not _curl_has_http2(), reason="curl with HTTP/2 support is not installed")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("h2tls"))


def tls_settings(cert: tuple[Path, Path]) -> dict[str, str]:
    return {"ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1])}


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with what it saw: version, scheme, method, path, query, host, body size."""
    assert scope["type"] == "http"
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    host = dict(scope["headers"]).get(b"host", b"-").decode()
    text = f"{scope['http_version']} {scope['scheme']} {scope['method']} {scope['path']} " \
           f"{scope['query_string'].decode()} {host} {size}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


def test_h2c_prior_knowledge_with_httpx(serve: Any) -> None:
    with serve(echo_app) as srv, httpx.Client(http1=False, http2=True, timeout=5) as client:
        r = client.get(f"{srv.url}/a/b?x=1")
        assert r.http_version == "HTTP/2"
        assert r.text == f"2 http GET /a/b x=1 127.0.0.1:{srv.port} 0"
        assert r.headers["server"] == "uvworker" and "date" in r.headers
        assert r.headers["content-length"] == str(len(r.text))
        body = bytes(range(256)) * 4096  # 1 MiB: more than the stream and connection windows
        r = client.post(f"{srv.url}/up", content=body)
        assert r.text.endswith(f" {len(body)}")


def test_http11_on_the_same_port(serve: Any) -> None:
    """Requests that start with P (POST, PUT, PATCH) are HTTP/1.1, not a preface."""
    with serve(echo_app) as srv, httpx.Client(timeout=5) as client:
        for method in ("GET", "POST", "PUT", "PATCH"):
            r = client.request(method, f"{srv.url}/p", content=b"abc")
            assert r.http_version == "HTTP/1.1"
            assert r.text.startswith(f"1.1 http {method} /p")


def test_preface_in_pieces(serve: Any) -> None:
    """A preface split across reads is recognised: its first bytes are held until it is whole."""
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    h2.initiate_connection()
    head = [(b":method", b"GET"), (b":path", b"/split"), (b":scheme", b"http"), (b":authority", b"x")]
    h2.send_headers(1, head, end_stream=True)
    data = h2.data_to_send()
    with serve(echo_app) as srv, srv.connect() as sock:
        for piece in (data[:3], data[3:10], data[10:20]):  # the preface is 24 bytes
            sock.sendall(piece)
            sock.settimeout(0.05)
            with pytest.raises(TimeoutError):  # no 400 for the partial preface: held, not parsed
                sock.recv(1)
        sock.settimeout(5)
        sock.sendall(data[20:])
        body, done = b"", False
        while not done:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            for event in h2.receive_data(chunk):
                if isinstance(event, DataReceived):
                    body += event.data
                done = done or isinstance(event, StreamEnded)
            sock.sendall(h2.data_to_send())
        assert body == b"2 http GET /split  x 0"


async def tls_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    tls = scope["extensions"].get("tls")
    body = f"{scope['http_version']} {tls['tls_version'] if tls else None} {bool(tls and tls['server_cert'])}"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})


def test_tls_extension_on_h2(cert: tuple[Path, Path]) -> None:
    with run_server(tls_app, **tls_settings(cert)) as srv, httpx.Client(http2=True, verify=False, timeout=5) as client:
        r = client.get(f"https://{srv.host}:{srv.port}/")
        assert r.http_version == "HTTP/2"
        version, has_cert = r.text.split()[1:]
        assert version.isdigit() and has_cert == "True"  # e.g. 772: TLS 1.3, as the spec numbers it
    with run_server(tls_app) as srv, httpx.Client(http1=False, http2=True, timeout=5) as client:
        assert client.get(srv.url).text == "2 None False"  # cleartext: no tls extension


def test_alpn_h2_and_http11_fallback(serve: Any, cert: tuple[Path, Path]) -> None:
    with serve(echo_app, **tls_settings(cert)) as srv:
        url = f"https://{srv.host}:{srv.port}/t"
        with httpx.Client(http2=True, verify=False, timeout=5) as client:
            for _ in range(2):
                r = client.get(url)
                assert r.http_version == "HTTP/2"
                assert r.text.startswith("2 https GET /t")
        with httpx.Client(verify=False, timeout=5) as client:  # offers http/1.1 only
            r = client.get(url)
            assert r.http_version == "HTTP/1.1"
            assert r.text.startswith("1.1 https GET /t")
        context = ssl.create_default_context(cafile=str(cert[0]))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection((srv.host, srv.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == "h2"


def test_no_http2(serve: Any, cert: tuple[Path, Path]) -> None:
    """--no-http2: the preface is a bad HTTP/1.1 request, and ALPN offers http/1.1 only."""
    with serve(echo_app, http2=False) as srv:
        conn = Conn(srv.connect())
        conn.send(PREFACE)
        assert conn.read_response().status in (400, 505)
    with serve(echo_app, http2=False, **tls_settings(cert)) as srv:
        with httpx.Client(http2=True, verify=False, timeout=5) as client:
            assert client.get(f"https://{srv.host}:{srv.port}/").http_version == "HTTP/1.1"


@needs_curl
def test_curl(cert: tuple[Path, Path]) -> None:
    with run_server(echo_app, **tls_settings(cert)) as srv:
        out = subprocess.run(
            ["curl", "-sS", "-k", "--http2", "-w", " %{http_version}", "-d", "hello", f"https://127.0.0.1:{srv.port}/c"],
            capture_output=True, text=True, timeout=20,
        )
        assert out.stdout == f"2 https POST /c  127.0.0.1:{srv.port} 5 2", out.stderr
    with run_server(echo_app) as srv:
        out = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-w", " %{http_version}", f"http://127.0.0.1:{srv.port}/c?q"],
            capture_output=True, text=True, timeout=20,
        )
        assert out.stdout == f"2 http GET /c q 127.0.0.1:{srv.port} 0 2", out.stderr


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
def test_h2load_short_load() -> None:
    with run_server(echo_app) as srv:
        out = subprocess.run(
            ["h2load", "-n", "2000", "-c", "8", "-m", "16", f"http://127.0.0.1:{srv.port}/"],
            capture_output=True, text=True, timeout=60,
        ).stdout
        assert "2000 succeeded, 0 failed, 0 errored" in out, out


def test_streams_run_concurrently() -> None:
    """Responses leave in the order the apps finish, not the order the requests came."""
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        else:
            release.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    with run_server(app) as srv:
        client = H2Client(srv.host, srv.port)
        slow = client.request(path="/slow")
        fast = client.request(path="/fast")
        client.read(lambda: client.responses[fast].ended)
        assert client.responses[fast].body == b"/fast"
        assert client.response(slow).body == b"/slow"
        client.close()


async def stream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    if path == "/error":
        raise RuntimeError("boom")
    if path == "/error-after-start":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")
    if path == "/no-content":
        await send({"type": "http.response.start", "status": 204, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"X-Mixed-Case", b"kept"), (b"connection", b"close"), (b"transfer-encoding", b"chunked"),
    ]})
    for i in range(3):
        await send({"type": "http.response.body", "body": b"piece%d " % i, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_streaming_head_errors() -> None:
    with run_server(stream_app) as srv:
        client = H2Client(srv.host, srv.port)
        r = get(client, "/stream")
        assert (r.status, r.body) == (200, b"piece0 piece1 piece2 ")
        assert r.get(b"x-mixed-case") == b"kept"  # names lowercased, as HTTP/2 requires
        assert r.get(b"connection") is None and r.get(b"transfer-encoding") is None
        assert r.get(b"content-length") is None
        r = client.response(client.request("HEAD", "/stream"))
        assert (r.status, r.body) == (200, b"")
        r = get(client, "/no-content")
        assert (r.status, r.body, r.get(b"content-length")) == (204, b"", None)  # RFC 9110 §8.6: none in a 204
        r = get(client, "/error")
        assert r.status == 500 and r.body == b"Internal Server Error"
        r = get(client, "/error-after-start")
        assert r.status == 200 and r.reset is not None and not r.ended  # cut, never taken as whole
        r = get(client, "/stream")  # the connection goes on
        assert r.status == 200
        client.close()


def test_bad_requests_get_4xx_on_their_stream() -> None:
    with run_server(echo_app, limit_request_fields=5) as srv:
        client = H2Client(srv.host, srv.port)
        r = get(client, "/", headers=[(f"x-{i}", "v") for i in range(6)])
        assert r.status == 431
        r = client.response(client.request("CONNECT"))
        assert r.status == 501  # no tunnels, as on HTTP/1.1
        r = get(client, "/", authority="a b")
        assert r.status == 400
        r = get(client, "/ok")
        assert r.status == 200 and r.body.startswith(b"2 http GET /ok")
        client.close()


def test_wsgi_access_log_proxy_headers_lifespan_state_and_load_shedding(caplog: pytest.LogCaptureFixture) -> None:
    """The same cycle as HTTP/1.1: a WSGI app, the access log line, trusted proxy headers,
    lifespan state in the scope, --limit-concurrency."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{environ['SERVER_PROTOCOL']} {environ['REMOTE_ADDR']} {len(body)}".encode()]

    with run_server(wsgi, interface="wsgi") as srv, httpx.Client(http1=False, http2=True, timeout=5) as client:
        r = client.post(srv.url + "/w", content=b"x" * 100_000, headers={"x-forwarded-for": "203.0.113.9"})
        assert r.http_version == "HTTP/2" and r.text == "HTTP/2.0 203.0.113.9 100000"  # as Gunicorn names it

    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            scope["state"]["db"] = "connected"
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        while scope["path"] == "/hold" and not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["state"]["db"].encode()})

    caplog.set_level("INFO", logger="uvworker.access")
    with run_server(app, lifespan="on", access_log=True, limit_concurrency=1) as srv:
        client = H2Client(srv.host, srv.port)
        hold = client.request(path="/hold")
        shed = client.response(client.request(path="/shed"))
        assert shed.status == 503  # one request in flight already
        release.set()
        assert client.response(hold).body == b"connected"
        client.close()
        wait_for(lambda: any('"GET /hold HTTP/2.0" 200' in r.getMessage() for r in caplog.records))


def test_wsgi_reads_a_body_sent_without_content_length() -> None:
    """HTTP/2 frames a request body by DATA frames, so a head needs no content-length: the WSGI
    app still reads the whole body (it used to read b'' for every such request)."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d %s" % (len(body), body[:5])]

    with run_server(wsgi, interface="wsgi") as srv:
        client = H2Client(srv.host, srv.port)
        posted = client.response(client.request("POST", "/p", body=b"hello" * 2000))
        split = client.request("POST", "/s", end=False)
        client.send_body(split, b"ab", end=False)
        client.send_body(split, b"cd", end=True)
        empty = client.request("POST", "/e", end=False)
        client.send_body(empty, b"", end=True)
        assert posted.status == 200 and posted.body == b"10000 hello"
        assert client.response(split).body == b"4 abcd"
        assert client.response(empty).body == b"0 "
        assert get(client, "/g").body == b"0 "  # HEADERS with END_STREAM: nothing to read
        client.close()

        def chunks() -> Any:
            yield b"xy"
            yield b"z"

        with httpx.Client(http1=False, http2=True, timeout=5) as hx:
            r = hx.post(srv.url + "/x", content=chunks())  # a stream of unknown length: no content-length
            assert r.http_version == "HTTP/2" and r.text == "3 xyz"


def test_stateless_encoder_round_trips_and_signals_table_size() -> None:
    """Our HPACK encoder (no dynamic table, blocks cached) decodes to the same headers with
    hpack's decoder, and a peer's new SETTINGS_HEADER_TABLE_SIZE starts the next block with a
    table size update (RFC 7541 §4.2)."""
    from hpack import Decoder

    from uvworker.core.h2 import StatelessEncoder

    encoder, decoder = StatelessEncoder(), Decoder()
    head = [(b":status", b"200"), (b":status", b"418"), (b"content-type", b"text/plain"),
            (b"server", b"uvworker"), (b"x-new-name", b"v" * 300), (b"set-cookie", b"a=b")]
    for _ in range(2):
        assert decoder.decode(encoder.encode(head), raw=True) == head
    encoder.header_table_size = 0
    block = encoder.encode(head)
    assert block[0] == 0x20  # size update to 0, then the fields
    assert decoder.decode(block, raw=True) == head
    assert encoder.encode(head)[0] != 0x20  # once


async def extensions_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    if path == "/extensions":
        body = repr(sorted(scope["extensions"])).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    elif path == "/hints":
        await send({"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload", b"</b.js>; rel=preload"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hinted"})
    elif path == "/trailers":
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"part 1 ", "more_body": True})
        await send({"type": "http.response.body", "body": b"part 2"})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": True})
        await send({"type": "http.response.trailers", "headers": [(b"X-Checksum", b"abc")]})
    elif path == "/file":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": scope["query_string"].decode()})


def test_early_hints_trailers_and_file_bodies(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "big").write_bytes(data)
    with run_server(extensions_app) as srv:
        client = H2Client(srv.host, srv.port)
        advertised = get(client, "/extensions").body
        assert advertised == b"['http.response.early_hint', 'http.response.pathsend', 'http.response.trailers']"
        r = get(client, "/hints")
        assert r.informational == [103] and (r.status, r.body) == (200, b"hinted")
        r = get(client, "/trailers")
        assert (r.status, r.body) == (200, b"part 1 part 2")
        assert r.trailers == [(b"grpc-status", b"0"), (b"x-checksum", b"abc")]
        r = client.response(client.request(path="/file?" + str(tmp_path / "big")))
        assert r.status == 200 and r.body == data and r.get(b"content-length") == str(len(data)).encode()
        r = client.response(client.request("HEAD", "/file?" + str(tmp_path / "big")))
        assert (r.status, r.body, r.get(b"content-length")) == (200, b"", str(len(data)).encode())
        client.close()
    with run_server(extensions_app) as srv, httpx.Client(http1=False, http2=True, timeout=5) as http:
        assert http.get(srv.url + "/hints").text == "hinted"  # httpx takes the 103 in its stride


PATHSEND_APP = """
import sys
async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.pathsend", "path": sys.argv[-1]})
"""


@needs_curl
def test_pathsend_memory_stays_flat(tmp_path: Path) -> None:
    """A 1 GiB file over h2 to curl (whose windows are wide open): the server reads it as the
    socket takes it, so its peak RSS stays where it was."""
    size = 1024 * 1024 * 1024
    path = tmp_path / "sparse"
    with open(path, "wb") as file:
        file.truncate(size)  # sparse: no disk needed
    (tmp_path / "pathsend_app.py").write_text(PATHSEND_APP.replace("sys.argv[-1]", repr(str(path))))
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "pathsend_app:app", "--app-dir", str(tmp_path), "--fd", str(sock.fileno()),
         "--lifespan", "off", "--no-access-log"], pass_fds=[sock.fileno()], stderr=subprocess.DEVNULL,
    )
    sock.close()
    try:
        def hwm() -> int:
            status = Path(f"/proc/{server.pid}/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0])  # KiB

        # The socket listens already: one HEAD waits for the server to come up (no body to take).
        probe = subprocess.run(["curl", "-sSI", "--max-time", "60", "-o", "/dev/null", f"http://127.0.0.1:{port}/x"],
                               capture_output=True, text=True, timeout=90)
        assert probe.returncode == 0, probe.stderr
        before = hwm()
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=120)
        assert out.stdout == str(size), out.stderr
        assert hwm() - before < 32 * 1024, f"peak RSS grew by {hwm() - before} KiB"
    finally:
        server.terminate()
        server.wait(10)


def test_limit_request_line_bounds_an_http2_request_as_http1(serve: Any) -> None:
    """--limit-request-line bounds an HTTP/2 request as it bounds HTTP/1.1's: the request line
    it would have in HTTP/1.1 (method, :path, the spaces and version) longer than the limit
    gets 414, on both protocols at the same length (Gunicorn's HTTP/2 refuses a :path over
    limit_request_line too). Before, HTTP/2 took any :path the header list allowed (128 KiB):
    /<20,000 bytes> was a 200 over h2c and a 414 over HTTP/1.1."""
    limit = 200
    fits = "/" + "a" * (limit - len("GET / HTTP/1.1"))
    with serve(echo_app, limit_request_line=limit) as srv, H2Client(srv.host, srv.port) as client:
        assert len(f"GET {fits} HTTP/1.1") == limit
        for path, status in [(fits, 200), (fits + "a", 414), ("/" + "b" * 20_000, 414), (fits[:-1] + "?q", 414)]:
            assert get(client, path).status == status, len(path)
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(build_request(target=path, headers=[("Connection", "close")]))
                assert conn.read_response().status == status, len(path)
        assert get(client, "/after").status == 200  # a refused request leaves the connection usable


async def client_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the protocol version and the client address the server saw."""
    assert scope["type"] == "http"
    text = f"{scope['http_version']} {scope['client'][0]}"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text.encode()})


def test_h2c_prior_knowledge_with_proxy_protocol_on(serve: Any) -> None:
    """With --proxy-protocol the PROXY header stays optional, and a connection without one
    may speak HTTP/2 by prior knowledge, as on any cleartext port (Gunicorn's gthread serves
    it too). Before, --proxy-protocol turned h2c off: the HTTP/2 preface got a 505 (httpx,
    curl --http2-prior-knowledge: no response). A PROXY header still opens HTTP/1.1, and
    gives the client address; a partial preface is held until the rest arrives."""
    with serve(client_app, proxy_protocol=True, proxy_allow_ips="*") as srv:
        with httpx.Client(http1=False, http2=True, timeout=5) as client:
            r = client.get(f"{srv.url}/")
            assert (r.http_version, r.text) == ("HTTP/2", "2 127.0.0.1")
        with H2Client(srv.host, srv.port, send_preface=False) as h2:
            stream = h2.h2.get_next_available_stream_id()
            head = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"127.0.0.1")]
            h2.h2.send_headers(stream, head, end_stream=True)
            h2.responses[stream] = H2Response()
            data = h2.h2.data_to_send()  # written in two pieces: "PR" (a PROXY header's start too), the rest
            h2.send_raw(data[:2])
            h2.send_raw(data[2:])
            assert h2.response(stream).body == b"2 127.0.0.1"
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 80\r\n" + build_request(headers=[("Connection", "close")]))
            assert conn.read_response().body == b"1.1 10.9.8.7"


@needs_curl
def test_h2c_prior_knowledge_after_a_proxy_header(serve: Any) -> None:
    """A PROXY header (v1 or v2) followed by the HTTP/2 preface speaks HTTP/2, with the client
    address the header gave, as HAProxy sends it to an h2c backend (``send-proxy`` with
    ``proto h2``) and curl --haproxy-protocol --http2-prior-knowledge does. Before, only a
    connection without a header could speak HTTP/2: the preface after one got a 505. Header and
    preface may come in any pieces; a malformed header still gets a 400."""
    v2_header = PROXY_V2_SIGNATURE + bytes([0x21, 0x11, 0, 12]) + socket.inet_aton("10.1.2.3") \
        + socket.inet_aton("127.0.0.1") + (4444).to_bytes(2, "big") + (80).to_bytes(2, "big")
    with serve(client_app, proxy_protocol=True, proxy_allow_ips="*") as srv:
        out = subprocess.run(["curl", "-sS", "--haproxy-protocol", "--http2-prior-knowledge", "-w", " %{http_version}",
                              f"{srv.url}/"], capture_output=True, text=True, timeout=20)
        assert out.stdout == "2 127.0.0.1 2", out.stderr
        for header, client in [(b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 80\r\n", b"10.9.8.7"), (v2_header, b"10.1.2.3")]:
            with H2Client(srv.host, srv.port, send_preface=False) as h2:
                stream = h2.h2.get_next_available_stream_id()
                head = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"127.0.0.1")]
                h2.h2.send_headers(stream, head, end_stream=True)
                h2.responses[stream] = H2Response()
                data = header + h2.h2.data_to_send()
                for cut in (3, len(header) - 1, len(header), len(header) + 2):  # inside and after the header
                    h2.send_raw(data[:cut])
                    data = data[cut:]
                    time.sleep(0.01)  # separate reads (most of the time; the server takes any split)
                h2.send_raw(data)
                assert h2.response(stream).body == b"2 " + client
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(b"PROXY TCP4 10.9.8.7 nowhere 5555 80\r\n" + PREFACE)
            assert conn.read_response().status == 400
