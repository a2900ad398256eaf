"""--timeout-request (issue 13, item 3): a request whose response is not complete in time is
ended. The client gets 504 when nothing was sent yet, else the connection closes before the
response is whole; the ASGI task is cancelled, a WSGI thread is left to finish (the pool makes
another meanwhile) and a worker with more such threads than --wsgi-threads is replaced.
WebSockets are exempt. Under Gunicorn the setting comes from UVWORKER_TIMEOUT_REQUEST.

The timeouts are short (0.4 s) and the upper bounds generous: the machine may be busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, respond
from tests.test_gunicorn import WORKERS, run_gunicorn

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 0.4


class StuckApp:
    """ASGI: /stuck never answers, /half sends a head and part of a body, then waits; both
    record their cancellation. Anything else is answered at once."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message["text"]})
            return
        try:
            if scope["path"] == "/stuck":
                await asyncio.sleep(60)
            elif scope["path"] in ("/half", "/half-chunked"):
                sized = scope["path"] == "/half"
                headers = [(b"content-length", b"10")] if sized else []
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b"abc", "more_body": True})
                await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await respond(send, body=b"quick")


def get(conn: Conn, target: str) -> None:
    conn.send(build_request(target=target))


def test_no_response_in_time_is_a_504_and_the_task_is_cancelled(serve: Any, caplog: Any) -> None:
    app = StuckApp()
    caplog.set_level(logging.ERROR, "uvworker.error")
    with serve(app, timeout_request=TIMEOUT) as srv, Conn.open(srv.host, srv.port) as conn:
        started = time.monotonic()
        get(conn, "/stuck?x=1")
        response = conn.read_response(timeout=10)
        elapsed = time.monotonic() - started
        assert response.status == 504
        assert response.has_token("connection", "close")
        conn.read_until_close(timeout=5)
        assert TIMEOUT <= elapsed < 5, elapsed
        assert app.cancelled.wait(5)
        assert srv.server.state.request_timeouts == 1
        wait_for(lambda: not srv.server.state.abandoned)  # a cancelled task is not left running
    lines = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage()]
    assert len(lines) == 1 and "GET /stuck" in lines[0] and " s " in lines[0], lines


@pytest.mark.parametrize("target", ["/half", "/half-chunked"])
def test_a_started_response_is_cut_never_completed(serve: Any, target: str) -> None:
    app = StuckApp()
    with serve(app, timeout_request=TIMEOUT) as srv, Conn.open(srv.host, srv.port) as conn:
        get(conn, target)
        head = conn.read_head(timeout=5)
        assert head.status == 200
        rest = conn.read_until_close(timeout=10)  # closed by the timeout, not by us
        if target == "/half":
            assert rest == b"abc"  # 3 of the 10 bytes announced: visibly incomplete
        else:
            assert rest.startswith(b"3\r\nabc\r\n") and not rest.endswith(b"0\r\n\r\n")
        assert app.cancelled.wait(5)
        assert srv.server.state.request_timeouts == 1


def test_a_started_close_delimited_response_ends_with_a_reset(serve: Any) -> None:
    """HTTP/1.0 without Content-Length: the body ends at the close, so a FIN would pass a
    cut body off as whole. The client sees a reset instead."""
    app = StuckApp()
    with serve(app, timeout_request=TIMEOUT) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/half-chunked", version="1.0"))
        head = conn.read_head(timeout=5)
        assert head.status == 200 and head.get("content-length") is None
        conn.sock.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while conn.sock.recv(65536):  # "abc", then the reset: never a clean end of file
                pass
        assert app.cancelled.wait(5)


def test_quick_requests_keep_their_connection_and_off_means_no_limit(serve: Any) -> None:
    app = StuckApp()
    with serve(app, timeout_request=TIMEOUT) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(3):  # one keep-alive connection outlives the request timeout
            get(conn, "/")
            assert conn.read_response(timeout=5).body == b"quick"
            time.sleep(TIMEOUT / 2)  # idle between requests: the keep-alive time is not counted
        assert srv.server.state.request_timeouts == 0
    # (The client's FIN at the end is a half-close: the stuck request stays in flight, so the
    # shutdown waits for it as for any, up to its bound.)
    with serve(app, timeout_request=0, timeout_graceful_shutdown=0.5) as srv, Conn.open(srv.host, srv.port) as conn:
        get(conn, "/stuck")
        with pytest.raises(TimeoutError):
            conn.read_head(timeout=TIMEOUT * 4)
        assert not app.cancelled.is_set()


def test_websockets_are_exempt(serve: Any) -> None:
    from websockets.sync.client import connect

    with serve(StuckApp(), timeout_request=TIMEOUT) as srv:
        with connect(f"ws://{srv.host}:{srv.port}/ws", open_timeout=5) as ws:
            deadline = time.monotonic() + TIMEOUT * 4
            while time.monotonic() < deadline:  # echoes keep working past the request timeout
                ws.send("ping")
                assert ws.recv(timeout=5) == "ping"
                time.sleep(0.05)
        assert srv.server.state.request_timeouts == 0


# -- WSGI ---------------------------------------------------------------------------------------


class StuckWSGI:
    """/stuck blocks its thread until ``release`` is set; anything else answers at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/stuck":
            self.release.wait(30)
            self.finished += 1
        start_response("200 OK", [("Content-Length", "5")])
        return [b"quick"]


def test_wsgi_thread_is_left_to_finish_and_replaced_meanwhile(serve: Any) -> None:
    app = StuckWSGI()
    with serve(app, interface="wsgi", wsgi_threads=1, timeout_request=TIMEOUT) as srv:
        state, pool = srv.server.state, srv.config.loaded_app.pool
        with Conn.open(srv.host, srv.port) as stuck:
            get(stuck, "/stuck")
            assert stuck.read_response(timeout=10).status == 504
        wait_for(lambda: len(state.abandoned) == 1)  # counted while its thread runs on
        with Conn.open(srv.host, srv.port) as conn:  # the only thread is stuck: another serves
            get(conn, "/")
            assert conn.read_response(timeout=5).body == b"quick"
        app.release.set()
        wait_for(lambda: app.finished == 1 and not state.abandoned)
        wait_for(lambda: pool.in_progress == 0)
        assert pool.threads <= pool.max_threads + 1  # the rejoined thread trims itself on its next job
        for _ in range(3):
            with Conn.open(srv.host, srv.port) as conn:
                get(conn, "/")
                assert conn.read_response(timeout=5).body == b"quick"
        wait_for(lambda: pool.threads <= pool.max_threads)
        assert state.request_timeouts == 1


WSGI_APP = '''
import os, time

def app(environ, start_response):
    if environ["PATH_INFO"] == "/stuck":
        time.sleep(60)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def status_of(url: str) -> int:
    return httpx.get(url, timeout=10).status_code


def test_a_worker_with_more_stuck_threads_than_wsgi_threads_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "stuckapp.py").write_text(WSGI_APP)
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k != "WEB_CONCURRENCY"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "stuckapp:app", "--app-dir", str(tmp_path), "--fd",
             str(sock.fileno()), "--workers", "1", "--wsgi-threads", "1", "--timeout-request", str(TIMEOUT),
             "--no-access-log", "--timeout-graceful-shutdown", "1"],
            cwd=ROOT, env=env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT,
        )
    sock.close()
    try:
        first = wait_for(lambda: served_pid(url), timeout=20)
        assert status_of(url + "/stuck") == 504  # one stuck thread: as many as --wsgi-threads
        assert served_pid(url) == first
        assert status_of(url + "/stuck") == 504  # two: more, so the worker asks for a replacement
        wait_for(lambda: served_pid(url) not in (first, None), timeout=20)
        text = log_path.read_text()
        assert "this worker asks to be replaced" in text and "retiring on its own" in text, text
        assert "Traceback" not in text
    finally:
        proc.terminate()
        proc.wait(20)


def served_pid(url: str) -> int | None:
    """The pid a worker answers with, None while nobody answers."""
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return int(response.text) if response.status_code == 200 else None


# -- Gunicorn -----------------------------------------------------------------------------------

GUNICORN_APP = '''
import asyncio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/stuck":
        await asyncio.sleep(60)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"quick"})
'''


@pytest.mark.parametrize("worker_class", WORKERS)
def test_gunicorn_takes_it_from_the_environment(tmp_path: Path, worker_class: str) -> None:
    env = {"UVWORKER_TIMEOUT_REQUEST": str(TIMEOUT)}
    with run_gunicorn(tmp_path, worker_class, app=GUNICORN_APP, env=env) as server:
        assert server.get("/stuck", timeout=10).status_code == 504
        assert server.get("/").text == "quick"
        wait_for(lambda: "Request timed out after" in server.log and "GET /stuck" in server.log)
