"""A hung worker's report names what it was doing (issue 13, item 5): when the heartbeat times
out (standalone: --timeout-worker; Gunicorn: its ``timeout``) the log has, next to the Python
stack, each request in flight with its method, path, client and age, so the operator sees
which endpoint blocked the event loop. Real processes, real SIGABRT from the real master."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import PARSERS, wait_for
from tests.test_gunicorn import WORKERS, run_gunicorn
from tests.test_timeout_request import served_pid

ROOT = Path(__file__).resolve().parent.parent

APP = '''
import asyncio, os, time

def stuck_here():
    time.sleep(60)  # blocks the event loop: no more heartbeats

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


@pytest.mark.parametrize("parser", PARSERS)
def test_standalone_worker_report_names_the_requests_in_flight(tmp_path: Path, parser: str) -> None:
    (tmp_path / "hungapp.py").write_text(APP)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k != "WEB_CONCURRENCY"}
    mark = tmp_path / "waiting"
    env["WAITING_MARK"] = str(mark)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "hungapp:app", "--app-dir", str(tmp_path), "--fd", str(sock.fileno()),
             "--workers", "1", "--timeout-worker", "1.5", "--http", parser, "--no-access-log"],
            cwd=ROOT, env=env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT,
        )
    sock.close()
    try:
        first = wait_for(lambda: served_pid(url), timeout=20)
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
            ws_port = ws.socket.getsockname()[1]
            background_get(url + "/waiting")
            wait_for(mark.exists)  # /waiting has reached the app
            background_get(url + "/block?secret=1")
            wait_for(lambda: "request(s) in flight:" in log_path.read_text(), timeout=15)
            wait_for(lambda: served_pid(url) not in (first, None), timeout=15)  # replaced
        text = log_path.read_text()
        check_report(text, ws_port)
        assert "secret" not in text  # paths, not query strings
        assert "killed by SIGABRT" in text  # it still dies of the abort
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("worker_class", WORKERS)
def test_gunicorn_timeout_report_names_the_requests_in_flight(tmp_path: Path, worker_class: str) -> None:
    mark = tmp_path / "waiting"
    env = {"WAITING_MARK": str(mark)}
    with run_gunicorn(tmp_path, worker_class, "timeout = 2\n", app=APP, env=env) as server:
        pid = int(server.get("/").text)
        background_get(server.url + "/waiting")
        wait_for(mark.exists)
        background_get(server.url + "/block")
        wait_for(lambda: f"Worker aborted (pid: {pid})" in server.log and "GET /block from" in server.log,
                 timeout=15)
        check_report(server.log, None)
