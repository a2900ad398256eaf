"""A hung worker's report names what it was doing (issue 13, item 5): when the heartbeat times
out (standalone: --timeout-worker; Gunicorn: its ``timeout``) the log has, next to the Python
stack, each request in flight with its method, path, client and age, so the operator sees
which endpoint blocked the event loop. Real processes, real SIGABRT from the real master."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import PARSERS, wait_for
from tests.test_gunicorn import WORKERS, run_gunicorn
from tests.test_timeout_request import served_pid

ROOT = Path(__file__).resolve().parent.parent

APP = '''
import asyncio, os, sqlite3, time

def stuck_here():
    time.sleep(60)  # blocks the event loop: no more heartbeats

def stuck_in_c():
    # Waits for a lock inside SQLite, which retries on its own: no signal handler runs.
    sqlite3.connect(os.environ["LOCKED_DB"], timeout=60).execute("BEGIN EXCLUSIVE")

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        return
    if scope["path"] == "/waiting":
        open(os.environ["WAITING_MARK"], "w").close()
        await asyncio.sleep(60)  # in flight, not blocking
    if scope["path"] == "/block":
        stuck_here()
    if scope["path"] == "/db":
        stuck_in_c()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
'''


def background_get(url: str) -> threading.Thread:
    def get() -> None:
        try:
            httpx.get(url, timeout=15)
        except httpx.HTTPError:
            pass  # the worker is aborted under it

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread


def check_report(log: str, ws_port: int | None) -> None:
    """The stack shows where it is stuck; the list shows both requests, the blocking one and
    the one that was waiting, with a client address and an age of at least a second."""
    assert "in stuck_here" in log, log
    report = log[log.index("request(s) in flight:"):]
    waiting = re.search(r"GET /waiting from 127\.0\.0\.1:\d+, (\d+\.\d) s", report)
    blocking = re.search(r"GET /block from 127\.0\.0\.1:\d+, (\d+\.\d) s", report)
    assert waiting and blocking, report
    assert float(waiting.group(1)) >= float(blocking.group(1)) >= 1.0, report
    if ws_port is not None:
        assert f"WEBSOCKET /ws from 127.0.0.1:{ws_port}, " in report, report


@contextlib.contextmanager
def standalone(tmp_path: Path, *args: str) -> Iterator[tuple[int, Path]]:
    """``uvworker hungapp:app --workers 1 --timeout-worker 3``; yields its port and log. (3 s: the
    watchdog reports 1 s into a stall, the abort comes 2 s in at the earliest: room for a busy machine)"""
    (tmp_path / "hungapp.py").write_text(APP)
    sock = socket.create_server(("127.0.0.1", 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k != "WEB_CONCURRENCY"}
    env |= {"WAITING_MARK": str(tmp_path / "waiting"), "LOCKED_DB": str(tmp_path / "locked.db")}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "hungapp:app", "--app-dir", str(tmp_path), "--fd", str(sock.fileno()),
             "--workers", "1", "--timeout-worker", "3", "--no-access-log", *args],
            cwd=ROOT, env=env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT,
        )
    port = sock.getsockname()[1]
    sock.close()
    try:
        yield port, log_path
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the SQLite database at ``path``."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.close()


@pytest.mark.parametrize("parser", PARSERS)
def test_standalone_worker_report_names_the_requests_in_flight(tmp_path: Path, parser: str) -> None:
    with standalone(tmp_path, "--http", parser) as (port, log_path):
        url = f"http://127.0.0.1:{port}"
        first = wait_for(lambda: served_pid(url), timeout=20)
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
            ws_port = ws.socket.getsockname()[1]
            background_get(url + "/waiting")
            wait_for((tmp_path / "waiting").exists)  # /waiting has reached the app
            background_get(url + "/block?secret=1")
            wait_for(lambda: "killed by SIGABRT" in log_path.read_text(), timeout=15)
            wait_for(lambda: served_pid(url) not in (first, None), timeout=15)  # replaced
        text = log_path.read_text()
        check_report(text[text.index("Worker 1 aborted"):], ws_port)  # the abort's report
        assert "The event loop has not turned for" in text  # and the watchdog's, earlier
        assert "secret" not in text  # paths, not query strings


def test_a_loop_blocked_in_c_code_is_reported_by_the_watchdog(tmp_path: Path) -> None:
    """No signal handler runs while SQLite waits for its lock; the watchdog thread reports."""
    with standalone(tmp_path) as (port, log_path), locked(tmp_path / "locked.db"):
        url = f"http://127.0.0.1:{port}"
        first = wait_for(lambda: served_pid(url), timeout=20)
        background_get(url + "/waiting")
        wait_for((tmp_path / "waiting").exists)
        background_get(url + "/db")
        wait_for(lambda: served_pid(url) not in (first, None), timeout=20)  # replaced
        wait_for(lambda: "killed by SIGKILL" in log_path.read_text(), timeout=15)
        text = log_path.read_text()
        assert "Worker 1 aborted" not in text, text  # no signal handler could run
        report = text[text.index("The event loop has not turned for"):]
        assert "in stuck_in_c" in report
        assert re.search(r"GET /db from 127\.0\.0\.1:\d+, \d+\.\d s", report), report
        assert re.search(r"GET /waiting from 127\.0\.0\.1:\d+, \d+\.\d s", report), report


@pytest.mark.parametrize("worker_class", WORKERS)
def test_gunicorn_timeout_report_names_the_requests_in_flight(tmp_path: Path, worker_class: str) -> None:
    mark = tmp_path / "waiting"
    env = {"WAITING_MARK": str(mark)}
    with run_gunicorn(tmp_path, worker_class, "timeout = 2\n", app=APP, env=env) as server:
        pid = int(server.get("/").text)
        background_get(server.url + "/waiting")
        wait_for(mark.exists)
        background_get(server.url + "/block")
        aborted = f"Worker aborted (pid: {pid})"
        wait_for(lambda: aborted in server.log and "GET /block from" in server.log.split(aborted)[-1], timeout=15)
        check_report(server.log.split(aborted)[-1], None)


def test_gunicorn_watchdog_reports_a_loop_blocked_in_c_code(tmp_path: Path) -> None:
    env = {"WAITING_MARK": str(tmp_path / "waiting"), "LOCKED_DB": str(tmp_path / "locked.db")}
    with locked(tmp_path / "locked.db"), run_gunicorn(tmp_path, conf="timeout = 2\n", app=APP, env=env) as server:
        pid = int(server.get("/").text)
        background_get(server.url + "/db")
        wait_for(lambda: "The event loop has not turned for" in server.log and "GET /db from" in server.log,
                 timeout=15)
        assert "in stuck_in_c" in server.log
        wait_for(lambda: int(server.get("/").text) != pid, timeout=15)  # killed and replaced
