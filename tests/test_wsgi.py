"""The WSGI interface (issue 4): environ, streaming wsgi.input, streamed responses, thread pool.

Every behaviour runs over real sockets on both parsers (the ``serve`` fixture), with plain
PEP 3333 callables as the apps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, capture_log, error_tracebacks, send_body, wait_until_stalled
from uvworker.config import Config
from uvworker.interfaces import detect_interface
from uvworker.interfaces.wsgi import FileWrapper, WSGIAdapter

MiB = 1024 * 1024
Environ = dict[str, Any]


def text_response(start_response: Any, body: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def environ_app(environ: Environ, start_response: Any) -> list[bytes]:
    """Answers with the environ's string values (and the types of the others) as JSON."""
    shown = {k: v if isinstance(v, str) else type(v).__name__ for k, v in environ.items()}
    shown["wsgi.version"] = list(environ["wsgi.version"])
    for key in ("wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once", "wsgi.input_terminated"):
        shown[key] = environ[key]
    shown["file_wrapper_is_ours"] = environ["wsgi.file_wrapper"] is FileWrapper
    return text_response(start_response, json.dumps(shown).encode())


def get_environ(srv: Any, raw: bytes) -> Environ:
    with Conn.open(srv.host, srv.port) as conn:
        conn.send(raw)
        resp = conn.read_response()
    assert resp.status == 200, resp.body
    return json.loads(resp.body)


# -- environ -------------------------------------------------------------------------------------


def test_environ_keys(serve: Any) -> None:
    with serve(environ_app) as srv:
        raw = build_request(
            "POST", "/a/b?x=1&y=%20", body=b"hello",
            headers=[("Content-Type", "text/plain"), ("X-Custom", "one"), ("Content-Length", "5")],
        )
        env = get_environ(srv, raw)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/a/b"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "5"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_X_CUSTOM"] == "one"
    assert env["HTTP_HOST"] == "testserver"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(srv.port))
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.input"] == "InputStream"
    assert env["wsgi.errors"] == type(sys.stderr).__name__
    assert env["wsgi.multithread"] is True and env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert env["file_wrapper_is_ours"] is True
    assert env["SERVER_SOFTWARE"].startswith("uvworker/")


def test_path_info_is_percent_decoded_latin1_and_script_name_from_root_path(serve: Any) -> None:
    with serve(environ_app, root_path="/mount") as srv:
        env = get_environ(srv, build_request("GET", "/caf%C3%A9/a%2Fb%20c?q=%C3%A9"))
    assert env["SCRIPT_NAME"] == "/mount"
    # PEP 3333: one character per byte of the decoded path, so apps re-encode with latin-1.
    assert env["PATH_INFO"] == "/café/a/b c".encode().decode("latin-1")
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/a/b c"
    assert env["QUERY_STRING"] == "q=%C3%A9"


def test_http_1_0_server_protocol(serve: Any) -> None:
    with serve(environ_app) as srv:
        env = get_environ(srv, build_request("GET", "/", version="1.0", host=False))
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert "HTTP_HOST" not in env


def test_duplicate_headers_joined_and_underscored_names_dropped(serve: Any) -> None:
    with serve(environ_app) as srv:
        raw = build_request("GET", headers=[
            ("Accept", "text/html"), ("Accept", "application/json"),
            ("Cookie", "a=1"), ("Cookie", "b=2"),
            ("X-Forwarded-Host", "real"), ("X_Forwarded_Host", "spoofed"),
        ])
        env = get_environ(srv, raw)
    assert env["HTTP_ACCEPT"] == "text/html,application/json"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["HTTP_X_FORWARDED_HOST"] == "real"


def test_url_scheme_and_remote_addr_honour_trusted_proxy_headers(serve: Any) -> None:
    raw = build_request("GET", headers=[("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "203.0.113.7")])
    with serve(environ_app) as srv:  # 127.0.0.1 is trusted by default
        env = get_environ(srv, raw)
    assert env["wsgi.url_scheme"] == "https"
    assert env["REMOTE_ADDR"] == "203.0.113.7"
    with serve(environ_app, forwarded_allow_ips="10.0.0.1") as srv:
        env = get_environ(srv, raw)
    assert env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.1"


def test_environ_of_each_request_on_a_keep_alive_connection_is_its_own(serve: Any) -> None:
    """The connection keeps the environ keys of its last head: a request that repeats it (or
    its HTTP version alone differs) gets its own request line, its own wsgi.input, and none of
    the keys an app set on an earlier environ."""
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        shown = {k: environ.get(k) for k in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
                                              "HTTP_X_A", "CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "mine")}
        shown["body"] = environ["wsgi.input"].read().decode()
        environ["mine"] = "set by the app"
        environ["HTTP_X_A"] = "changed by the app"
        return text_response(start_response, json.dumps(shown).encode())

    keep = [("Connection", "keep-alive"), ("X-A", "1")]
    chunked = [*keep, ("Transfer-Encoding", "chunked")]
    requests = [
        (build_request("GET", "/a?x=1", headers=keep), ("GET", "/a", "x=1", "HTTP/1.1", "1", None, None, "")),
        (build_request("GET", "/e", headers=keep), ("GET", "/e", "", "HTTP/1.1", "1", None, None, "")),
        (build_request("GET", "/j", headers=keep), ("GET", "/j", "", "HTTP/1.1", "1", None, None, "")),
        (build_request("HEAD", "/b", headers=keep), ("HEAD", "/b", "", "HTTP/1.1", "1", None, None, None)),
        (build_request("GET", "/c%20d", headers=keep, version="1.0"), ("GET", "/c d", "", "HTTP/1.0", "1", None, None, "")),
        (build_request("POST", "/f", headers=chunked) + b"3\r\none\r\n0\r\n\r\n",
         ("POST", "/f", "", "HTTP/1.1", "1", None, "chunked", "one")),
        (build_request("POST", "/g", headers=chunked) + b"3\r\ntwo\r\n0\r\n\r\n",
         ("POST", "/g", "", "HTTP/1.1", "1", None, "chunked", "two")),
        (build_request("GET", "/h", headers=[("Connection", "keep-alive"), ("X-A", "2")]),
         ("GET", "/h", "", "HTTP/1.1", "2", None, None, "")),
        (build_request("PUT", "/i", headers=keep, body=b"abc"), ("PUT", "/i", "", "HTTP/1.1", "1", "3", None, "abc")),
    ]
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for raw, expected in requests * 2:
            conn.send(raw)
            resp = conn.read_response("HEAD" if raw.startswith(b"HEAD") else "GET")
            assert resp.status == 200
            if expected[0] == "HEAD":
                continue
            shown = json.loads(resp.body)
            assert shown.pop("mine") is None
            assert tuple(shown.values()) == expected


def test_trusted_proxy_headers_per_request_on_a_keep_alive_connection(serve: Any) -> None:
    """A connection keeps the environ part its requests share (client, scheme) while they stay
    the same, compared by value: each request through the proxy gets its own client and scheme."""
    sent = [
        ([("X-Forwarded-For", "203.0.113.7")], ("203.0.113.7", "http")),
        ([("X-Forwarded-For", "203.0.113.7")], ("203.0.113.7", "http")),
        ([("X-Forwarded-For", "198.51.100.1")], ("198.51.100.1", "http")),
        ([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "https")], ("198.51.100.1", "https")),
        ([], ("127.0.0.1", "http")),
        ([("X-Forwarded-For", "203.0.113.7")], ("203.0.113.7", "http")),
        ([], ("127.0.0.1", "http")),
    ]
    with serve(environ_app) as srv, Conn.open(srv.host, srv.port) as conn:  # 127.0.0.1 is trusted by default
        for headers, expected in sent * 2:
            conn.send(build_request("GET", headers=headers))
            resp = conn.read_response()
            assert resp.status == 200
            env = json.loads(resp.body)
            assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"]) == expected


# -- wsgi.input ----------------------------------------------------------------------------------


def input_script_app(environ: Environ, start_response: Any) -> list[bytes]:
    """Runs the reads named in the query string (``read:3,readline,readlines,iter,read``) and
    answers with what each returned, as JSON."""
    stream = environ["wsgi.input"]
    results = []
    for step in environ["QUERY_STRING"].split(","):
        name, _, arg = step.partition(":")
        if name == "read":
            results.append(stream.read(int(arg)) if arg else stream.read())
        elif name == "readline":
            results.append(stream.readline(int(arg)) if arg else stream.readline())
        elif name == "readlines":
            results.append(b"|".join(stream.readlines()))
        elif name == "iter":
            results.append(b"|".join(stream))
    return text_response(start_response, json.dumps([r.decode() for r in results]).encode())


def send_body_in_pieces(conn: Conn, head: bytes, pieces: list[bytes], chunked: bool) -> None:
    conn.send(head)
    for piece in pieces:
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        conn.send(b"0\r\n\r\n")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_input_read_readline_readlines_iteration(serve: Any, chunked: bool) -> None:
    body = b"abcdef\nline two\nthird\n\nlast without newline"
    pieces = [body[:3], body[3:10], body[10:11], body[11:]]
    script = "read:2,read:0,readline,readline:4,readline,read:5,readlines"
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))
    with serve(input_script_app) as srv, Conn.open(srv.host, srv.port) as conn:
        send_body_in_pieces(conn, build_request("POST", "/?" + script, headers=[framing]), pieces, chunked)
        resp = conn.read_response()
        assert resp.status == 200, resp.body
        assert json.loads(resp.body) == [
            "ab", "", "cdef\n", "line", " two\n", "third", "\n|\n|last without newline",
        ]
        # Iteration, then read() at the end of the body returns b"" (no wait for more).
        send_body_in_pieces(conn, build_request("POST", "/?iter,read,read:10,readline", headers=[framing]), pieces, chunked)
        resp = conn.read_response()
        assert json.loads(resp.body) == [body.decode().replace("\n", "\n|").rstrip("|"), "", "", ""]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_read_n_returns_n_bytes_across_pieces(serve: Any, chunked: bool) -> None:
    payload = bytes(range(256)) * 4100  # 1 MiB + 1 KiB: the last read is short
    sizes: list[int] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        digest = hashlib.sha256()
        while chunk := environ["wsgi.input"].read(65536):
            sizes.append(len(chunk))
            digest.update(chunk)
        return text_response(start_response, digest.hexdigest().encode())

    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(payload)))
    pieces = [payload[i : i + 10_000] for i in range(0, len(payload), 10_000)]
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        send_body_in_pieces(conn, build_request("POST", headers=[framing]), pieces, chunked)
        resp = conn.read_response(timeout=10)
    assert resp.body == hashlib.sha256(payload).hexdigest().encode()
    assert all(size == 65536 for size in sizes[:-1]) and sizes[-1] == len(payload) % 65536


def test_get_without_body_reads_empty(serve: Any) -> None:
    with serve(input_script_app) as srv:
        resp = httpx.get(srv.url + "/?read,readline,read:5")
    assert json.loads(resp.content) == ["", "", ""]


def test_upload_backpressure_when_app_does_not_read(serve: Any) -> None:
    """The app sleeps before reading a 50 MiB upload: the server stops reading the socket,
    so the client's sends stall after socket buffers plus a small buffer; then all arrives."""
    total = 50 * MiB
    release = threading.Event()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        release.wait(20)
        stream = environ["wsgi.input"]
        received = 0
        while chunk := stream.read(65536):
            received += len(chunk)
        return text_response(start_response, str(received).encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port, sndbuf=65536) as conn:
        conn.send(build_request("POST", "/upload", headers=[("Content-Length", str(total))]))
        sent = send_body(conn, total)
        assert sent < 4 * MiB, f"server accepted {sent / MiB:.1f} MiB for an app that reads nothing yet"
        release.set()
        send_body(conn, total, sent, stall=None)
        resp = conn.read_response(timeout=10)
    assert (resp.status, resp.body) == (200, str(total).encode())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_client_disconnect_mid_body_raises_oserror(serve: Any, chunked: bool) -> None:
    seen: list[BaseException | bytes] = []
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"never sent"

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Body:
        try:
            seen.append(environ["wsgi.input"].read())
        except BaseException as exc:
            seen.append(exc)
            raise
        start_response("200 OK", [])
        return Body()

    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", "100000")
    with serve(app) as srv, capture_log() as records:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("POST", headers=[framing]))
            conn.send(b"3e8\r\n" + b"x" * 1000 + b"\r\n" if chunked else b"x" * 1000)
            wait_for(lambda: srv.server.active_requests == 1)
        wait_for(lambda: seen)
        wait_for(lambda: srv.server.active_requests == 0)
    error = seen[0]
    assert isinstance(error, OSError), f"read() returned {error!r} instead of raising"
    assert not closed.is_set()  # the app raised before returning an iterable
    assert not error_tracebacks(records), "a client disconnect is not an application error"


def test_expect_100_continue_only_when_app_reads(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/read":
            return text_response(start_response, environ["wsgi.input"].read())
        return text_response(start_response, b"not read", "413 Content Too Large")

    with serve(app) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("POST", "/read", headers=[("Expect", "100-continue"), ("Content-Length", "4")]))
            assert conn.read_head().status == 100
            conn.send(b"data")
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"data")
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("POST", "/skip", headers=[("Expect", "100-continue"), ("Content-Length", "4")]))
            resp = conn.read_response()
            assert (resp.status, resp.body) == (413, b"not read")


# -- responses -----------------------------------------------------------------------------------


def test_streamed_response_is_chunked_and_close_is_called(serve: Any) -> None:
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"first,"
            yield b""
            yield b"second"

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert resp.body == b"first,second"
        assert resp.chunked or resp.get("content-length") == "12"
        wait_for(closed.is_set)
        conn.send(build_request("HEAD"))
        resp = conn.read_response("HEAD")
        assert resp.status == 200 and resp.body == b""
        conn.assert_open()


def test_list_response_gets_content_length(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("201 Created", [("X-App", "yes")])
        return [b"a", b"bc", b""]

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
    assert (resp.status, resp.body, resp.get("content-length"), resp.get("x-app")) == (201, b"abc", "3", "yes")


def test_response_headers_of_each_request_are_its_own(serve: Any) -> None:
    """The headers start_response was given last are remembered with their encoding: a
    response repeating them, changing a value, or reusing the app's own list changed in place
    (one pair a list, changed in place too) gets its own."""
    shared: list[Any] = [("X-A", "1")]
    pair = ["X-L", "v"]
    responses = iter([
        [("X-A", "1")], [("X-A", "1")], [("X-A", "2")], [("X-A", "1"), ("Content-Length", "2")],
        shared, shared, [pair], [pair], [],
    ])

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        headers = next(responses)
        if headers is shared:
            shared.append(("X-B", str(len(shared))))  # the same list as the last time, longer
        start_response("200 OK", headers)
        if headers and headers[0] is pair:
            pair[1] = "w"  # the next response sends the same pair, changed
        return [b"body"]

    expected = [
        ("1", None, None, None, b"body"), ("1", None, None, None, b"body"), ("2", None, None, None, b"body"),
        ("1", None, None, None, b"bo"), ("1", "1", None, None, b"body"), ("1", "1,2", None, None, b"body"),
        (None, None, "v", None, b"body"), (None, None, "w", None, b"body"), (None, None, None, None, b"body"),
    ]
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for want in expected:
            conn.send(build_request())
            resp = conn.read_response()
            assert (resp.get("x-a"), ",".join(resp.get_all("x-b")) or None, resp.get("x-l"), None, resp.body) == want


def test_write_callable(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        write(b"then ")
        return [b"returned"]

    with serve(app) as srv:
        assert httpx.get(srv.url).content == b"written then returned"


def test_content_length_is_not_exceeded(serve: Any) -> None:
    produced: list[int] = []

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        for i in range(100):
            produced.append(i)
            yield b"hello world"

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().body == b"hello"
        conn.send(build_request())  # the connection is still in sync
        assert conn.read_response().body == b"hello"
    assert len(produced) == 2  # iteration stopped once the Content-Length was reached


def test_response_backpressure_app_thread_waits_for_slow_client(serve: Any) -> None:
    progress = {"chunks": 0}
    closed = threading.Event()
    chunk = b"z" * 65536

    class Endless:
        def __iter__(self) -> Iterator[bytes]:
            while True:
                progress["chunks"] += 1
                yield chunk

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Endless:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Endless()

    with serve(app) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
        conn.send(build_request())
        wait_until_stalled(lambda: progress["chunks"])
        produced = progress["chunks"] * len(chunk)
        assert produced < 8 * MiB, f"app produced {produced / MiB:.1f} MiB for a client that reads nothing"
        conn.read_head()
        conn.read_exact(4 * MiB, time.monotonic() + 10)  # reading lets the app go on
        wait_for(lambda: progress["chunks"] * len(chunk) > produced)
        assert not closed.is_set()
    wait_for(closed.is_set)  # the client went away: iteration stops and close() is called


def test_file_wrapper_sends_file_with_content_length(serve: Any, tmp_path: Any) -> None:
    path = tmp_path / "data.bin"
    payload = bytes(range(256)) * 8000  # ~2 MB
    path.write_bytes(payload)
    files: list[Any] = []

    def app(environ: Environ, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        handle = open(path, "rb")
        handle.seek(10)
        files.append(handle)
        return environ["wsgi.file_wrapper"](handle, 4096)

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response(timeout=10)
    assert resp.body == payload[10:]
    assert resp.get("content-length") == str(len(payload) - 10) and not resp.chunked
    wait_for(lambda: files[0].closed)


# -- errors and exc_info -------------------------------------------------------------------------


def test_app_exception_is_500_logged_once_and_close_called(serve: Any) -> None:
    closed = threading.Event()

    class Failing:
        def __iter__(self) -> Iterator[bytes]:
            raise ValueError("boom in iteration")
            yield b""  # pragma: no cover

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Failing:
        start_response("200 OK", [])
        return Failing()

    with serve(app) as srv, capture_log() as records:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 500
            assert resp.has_token("connection", "close")
        wait_for(closed.is_set)
        wait_for(lambda: error_tracebacks(records))
    tracebacks = error_tracebacks(records)
    assert len(tracebacks) == 1 and "boom in iteration" in str(tracebacks[0].exc_info[1])


@pytest.mark.parametrize("status, headers, body", [
    ("100 Continue", [], b""),  # 1xx are the server's to send
    ("200 OK", [("X-Bad", "a\r\nInjected: yes")], b"hello"),  # refused by the engine
    ("200 OK", [("Content-Length", "10")], b"hello"),  # shorter than announced
], ids=["1xx-status", "crlf-header", "short-body"])
def test_a_whole_response_the_engine_refuses_is_500_logged_once(serve: Any, status: str, headers: Any,
                                                                 body: bytes) -> None:
    """Whole responses are written without a task (the fast path): what the engine refuses
    there is reported as the ASGI path does, and the server goes on."""
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/ok":
            return text_response(start_response, b"fine")
        start_response(status, headers)
        return [body]

    with serve(app) as srv, capture_log() as records:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 500 and resp.has_token("connection", "close")
            assert b"Injected" not in resp.head
        wait_for(lambda: error_tracebacks(records))
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("GET", "/ok"))
            assert conn.read_response().body == b"fine"
    assert len(error_tracebacks(records)) == 1


def test_exc_info_before_headers_sent_replaces_the_response(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Original", "1")])
        try:
            raise KeyError("failure")
        except KeyError:
            start_response("503 Service Unavailable", [("X-Error", "1")], sys.exc_info())
        return [b"error page"]

    with serve(app) as srv:
        resp = httpx.get(srv.url)
    assert (resp.status_code, resp.content) == (503, b"error page")
    assert "x-error" in resp.headers and "x-original" not in resp.headers


def test_exc_info_after_headers_sent_reraises_and_aborts(serve: Any) -> None:
    outcome: list[str] = []

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise KeyError("late failure")
        except KeyError:
            try:
                start_response("500 Internal Server Error", [], sys.exc_info())
            except KeyError:
                outcome.append("re-raised")
                raise

    with serve(app) as srv, capture_log(), Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        head = conn.read_head()
        assert head.status == 200
        data = conn.read_until_close()  # the response cannot complete: the connection closes
        assert b"0\r\n\r\n" not in data
    assert outcome == ["re-raised"]


def test_second_start_response_without_exc_info_is_an_error(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"unreachable"]

    with serve(app) as srv, capture_log() as records:
        assert httpx.get(srv.url).status_code == 500
        wait_for(lambda: error_tracebacks(records))


@pytest.mark.parametrize("body", [["text"], [None]], ids=["str", "None"])
def test_non_bytes_body_is_500(serve: Any, body: list[Any]) -> None:
    def app(environ: Environ, start_response: Any) -> Iterator[Any]:
        start_response("200 OK", [])
        yield from body

    with serve(app) as srv, capture_log():
        assert httpx.get(srv.url).status_code == 500


def test_start_response_never_called_is_500(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        return [b"no status"]

    with serve(app) as srv, capture_log() as records:
        assert httpx.get(srv.url).status_code == 500
        wait_for(lambda: error_tracebacks(records))


# -- thread pool ---------------------------------------------------------------------------------


def test_full_pool_and_queue_answer_503_at_once(serve: Any) -> None:
    release = threading.Event()
    started: list[str] = []

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        started.append(environ["PATH_INFO"])
        release.wait(10)
        return text_response(start_response, environ["PATH_INFO"].encode())

    with serve(app, wsgi_threads=1, wsgi_queue=1) as srv:
        first, queued = Conn.open(srv.host, srv.port), Conn.open(srv.host, srv.port)
        try:
            first.send(build_request("GET", "/first"))
            wait_for(lambda: started == ["/first"])
            queued.send(build_request("GET", "/queued"))
            wait_for(lambda: srv.server.active_requests == 2)
            t0 = time.monotonic()
            with Conn.open(srv.host, srv.port) as third:
                third.send(build_request("GET", "/third"))
                resp = third.read_response()
                assert resp.status == 503 and resp.has_token("connection", "close")
            assert time.monotonic() - t0 < 2
            assert started == ["/first"]
            release.set()
            assert first.read_response().body == b"/first"
            assert queued.read_response().body == b"/queued"
        finally:
            first.close()
            queued.close()


def test_threads_run_apps_concurrently(serve: Any) -> None:
    barrier = threading.Barrier(3, timeout=5)

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        barrier.wait()  # only passes if three requests run at the same time
        return text_response(start_response, b"ok")

    with serve(app, wsgi_threads=3) as srv:
        results: list[int] = []

        def get() -> None:
            results.append(httpx.get(srv.url, timeout=10).status_code)

        clients = [threading.Thread(target=get) for _ in range(3)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(10)
    assert results == [200, 200, 200]


def test_many_clients_mixing_slow_and_fast_responses_each_get_their_own(serve: Any) -> None:
    """Responses finished by the pool in one burst are handed to the loop together: each must
    reach its own client, on every connection, whatever the order they finish in."""

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        name = environ["PATH_INFO"].encode()
        if environ["QUERY_STRING"] == "slow":
            start_response("200 OK", [("Content-Type", "text/plain")])
            for piece in (b"slow:", name):
                time.sleep(0.01)
                yield piece
        else:
            yield from text_response(start_response, b"fast:" + name)

    failures: list[str] = []

    def client(index: int) -> None:
        try:
            with Conn.open(srv.host, srv.port) as conn:
                for n in range(15):
                    slow = (index + n) % 4 == 0
                    path = f"/{index}-{n}"
                    conn.send(build_request("GET", path + ("?slow" if slow else "")))
                    body = conn.read_response(timeout=10).body
                    if body != (b"slow:" if slow else b"fast:") + path.encode():
                        failures.append(f"{path}: {body!r}")
        except Exception as exc:  # noqa: BLE001 - reported below, with the others
            failures.append(f"client {index}: {exc!r}")

    with serve(app, wsgi_threads=4) as srv:
        clients = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        assert not failures, failures[:5]
        assert srv.server.requests_served >= 24 * 15


def test_client_gone_mid_response_frees_the_thread_and_closes_the_iterable(serve: Any) -> None:
    closed = threading.Event()
    chunk = b"y" * 16384

    class Endless:
        def __iter__(self) -> Iterator[bytes]:
            while True:
                yield chunk

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/next":
            return text_response(start_response, b"next")
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return Endless()

    with serve(app, wsgi_threads=1) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            conn.read_head()
            conn.read_exact(len(chunk) * 4, time.monotonic() + 10)
        wait_for(closed.is_set)  # the one thread is free again ...
        with Conn.open(srv.host, srv.port) as conn:  # ... and serves the next request
            conn.send(build_request("GET", "/next"))
            assert conn.read_response(timeout=10).body == b"next"


def test_streamed_response_far_larger_than_the_transport_buffer_after_reading_the_body(serve: Any) -> None:
    """The app reads the request body (the loop answers its reads), then streams many times what
    the transport buffers (the loop makes it wait, then lets it go on): every byte arrives, in
    order, to a client with a small receive buffer."""
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 128  # 8 MiB

    def app(environ: Environ, start_response: Any) -> Iterator[bytes]:
        digest = hashlib.sha256(environ["wsgi.input"].read()).hexdigest()
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("X-Body", digest)])
        for n in range(pieces):
            yield piece[n % 256 :] + piece[: n % 256]

    upload = b"u" * (3 * MiB)
    expected = hashlib.sha256(b"".join(piece[n % 256 :] + piece[: n % 256] for n in range(pieces))).hexdigest()
    with serve(app) as srv, Conn.open(srv.host, srv.port, rcvbuf=65536) as conn:
        conn.send(build_request("POST", body=upload))
        resp = conn.read_response(timeout=60)
        assert resp.get("x-body") == hashlib.sha256(upload).hexdigest()
        assert len(resp.body) == pieces * len(piece) and hashlib.sha256(resp.body).hexdigest() == expected
        conn.send(build_request("GET"))  # the connection is still in step
        assert len(conn.read_response(timeout=60).body) == pieces * len(piece)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_pool_threads_do_not_preempt_the_event_loop_on_wake_up(serve: Any) -> None:
    """Pool threads are SCHED_BATCH: woken while the loop holds the GIL, they wait their turn."""

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        return text_response(start_response, str(os.sched_getscheduler(0)).encode())

    with serve(app) as srv:
        assert httpx.get(srv.url).content == str(os.SCHED_BATCH).encode()
    assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the test's (the loop's) thread is left alone


def test_a_served_request_leaves_no_reference_cycle_for_the_collector(serve: Any) -> None:
    """Freed by reference counting alone: garbage in cycles waits for the collector, whose
    full passes stall the loop (wsgi-hello's p99 was 17 ms with one cycle per request, 5 without)."""
    import gc

    from uvworker.interfaces.wsgi import Exchange

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        return text_response(start_response, b"hi")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().body == b"hi"  # threads started, first-use objects made
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                conn.send(build_request())
                assert conn.read_response().body == b"hi"
            gc.collect()
            cyclic = [obj for obj in gc.garbage if isinstance(obj, Exchange)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert cyclic == []


def test_keep_alive_many_requests_one_connection(serve: Any) -> None:
    def app(environ: Environ, start_response: Any) -> list[bytes]:
        return text_response(start_response, environ["wsgi.input"].read() or environ["PATH_INFO"].encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for i in range(20):
            if i % 2:
                conn.send(build_request("POST", body=b"body %d" % i))
                assert conn.read_response().body == b"body %d" % i
            else:
                conn.send(build_request("GET", f"/{i}"))
                assert conn.read_response().body == f"/{i}".encode()
        # pipelined
        conn.send(build_request("GET", "/p1") + build_request("POST", body=b"p2") + build_request("GET", "/p3"))
        assert [conn.read_response().body for _ in range(3)] == [b"/p1", b"p2", b"/p3"]


# -- interface detection and lifespan --------------------------------------------------------------


class ClassApp:
    """PEP 3333 allows a class as the application: instances are the response iterables."""

    def __init__(self, environ: Environ, start_response: Any) -> None:
        start_response("200 OK", [("Content-Type", "text/plain")])

    def __iter__(self) -> Iterator[bytes]:
        yield b"from a class"


class CallableApp:
    def __call__(self, environ: Environ, start_response: Any) -> list[bytes]:
        return text_response(start_response, b"from an instance")


def test_detection() -> None:
    async def asgi3(scope: Any, receive: Any, send: Any) -> None: ...

    def asgi2(scope: Any) -> Any: ...

    assert detect_interface(environ_app) == "wsgi"
    assert detect_interface(ClassApp) == "wsgi"
    assert detect_interface(CallableApp()) == "wsgi"
    assert detect_interface(asgi3) == "asgi3"
    assert detect_interface(asgi2) == "asgi2"
    config = Config(environ_app)
    config.load()
    assert isinstance(config.loaded_app, WSGIAdapter)
    config = Config(CallableApp(), interface="wsgi", wsgi_threads=3, wsgi_queue=7)
    config.load()
    assert isinstance(config.loaded_app, WSGIAdapter)
    assert (config.loaded_app.pool.max_threads, config.loaded_app.pool.limit) == (3, 10)


@pytest.mark.parametrize("app, body", [(ClassApp, b"from a class"), (CallableApp(), b"from an instance")])
def test_class_and_instance_apps_with_lifespan_on(serve: Any, app: Any, body: bytes) -> None:
    with serve(app, lifespan="on") as srv:  # the adapter answers lifespan itself
        assert httpx.get(srv.url).content == body


class FakeExchange:
    """Hands out a body in the given pieces, as the event loop would."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def receive_body(self) -> tuple[bytes, bool]:
        return self.pieces.pop(0), len(self.pieces) > 0


def test_input_stream_reads_like_a_buffered_file() -> None:
    """Random reads over random piece boundaries return what io.BytesIO returns."""
    import io
    import random

    from uvworker.interfaces.wsgi import InputStream

    rng = random.Random(4)
    for _ in range(300):
        body = bytes(rng.choice(b"ab\n") for _ in range(rng.randrange(0, 300)))
        cuts = sorted(rng.sample(range(len(body) + 1), k=min(len(body) + 1, rng.randrange(1, 8))))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        stream, expected = InputStream(FakeExchange(pieces), eof=False), io.BytesIO(body)  # type: ignore[arg-type]
        while True:
            op, n = rng.choice(["read", "readline"]), rng.choice([-1, 0, 1, 2, 5, 17, 64, None])
            got, want = getattr(stream, op)(n), getattr(expected, op)(n)
            assert got == want, (op, n, pieces)
            if op == "read" and n in (-1, None):
                break
        assert stream.read() == b"" and stream.readline() == b""


# -- shutdown --------------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_the_request_in_the_thread(serve: Any) -> None:
    release = threading.Event()
    started = threading.Event()

    def app(environ: Environ, start_response: Any) -> list[bytes]:
        started.set()
        release.wait(10)
        return text_response(start_response, b"finished")

    with serve(app, lifespan="on") as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        wait_for(started.is_set)
        srv.server.should_exit = True
        conn.assert_open(0.1)
        release.set()
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"finished")
        assert resp.has_token("connection", "close")
        srv.thread.join(10)
        assert not srv.thread.is_alive()
        pool = srv.config.loaded_app.pool
        wait_for(lambda: pool.threads == 0)  # lifespan shutdown let the idle threads go


def test_shutdown_timeout_does_not_wait_for_a_stuck_app(serve: Any) -> None:
    release = threading.Event()
    started = threading.Event()
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            release.wait(10)
            yield b"too late"

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: Any) -> Body:
        started.set()
        start_response("200 OK", [])
        return Body()

    with serve(app, timeout_graceful_shutdown=0.2) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        wait_for(started.is_set)
        srv.server.should_exit = True
        srv.thread.join(10)
        assert not srv.thread.is_alive(), "the server waited for a stuck WSGI app"
        assert conn.read_until_close() == b""
        assert not closed.is_set()
        release.set()
        wait_for(closed.is_set)  # the app's thread still finishes and closes its iterable
