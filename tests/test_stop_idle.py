"""Idle keep-alive connections when the server stops, through real processes and signals
(issue 11 item 5).

When the whole server stops (SIGTERM to the single process, or to the supervisor), nobody
else would answer an idle connection's next request: it is closed at once, well before its
keep-alive timeout. When one worker retires while the others keep serving (SIGHUP reload),
an idle connection stays open, and its next request is answered (with ``Connection: close``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request

ROOT = Path(__file__).resolve().parent.parent
KEEP_ALIVE = "60"  # far longer than any wait here: a close within seconds is the stop's doing
LISTENER = ""  # /proc/PID/fd's name for the listening socket of the running server


@contextmanager
def server(*options: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``uvworker examples.hello:app`` on a socket bound here (--fd), with ``options``."""
    global LISTENER
    with socket.create_server(("127.0.0.1", 0)) as sock:
        fd = sock.fileno()
        LISTENER = f"socket:[{os.fstat(fd).st_ino}]"
        env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "examples.hello:app", "--fd", str(fd), "--no-access-log",
             "--timeout-keep-alive", KEEP_ALIVE, *options],
            cwd=ROOT, env=env, pass_fds=[fd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        port = sock.getsockname()[1]
    try:
        wait_for(lambda: _answers(port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def _answers(port: int) -> bool:
    try:
        with Conn.open("127.0.0.1", port) as conn:
            conn.send(build_request())
            return conn.read_response(timeout=1).status == 200
    except (OSError, AssertionError):
        return False


def idle_connection(port: int) -> Conn:
    conn = Conn.open("127.0.0.1", port)
    conn.send(build_request())
    resp = conn.read_response()
    assert resp.status == 200 and not resp.has_token("connection", "close")
    return conn


@pytest.mark.parametrize("options", [(), ("--workers", "2")], ids=["single-process", "supervisor"])
def test_sigterm_closes_idle_connections_at_once(options: tuple[str, ...]) -> None:
    with server(*options) as (proc, port):
        conns = [idle_connection(port) for _ in range(4)]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for conn in conns:
            with conn:
                assert conn.read_until_close(timeout=10) == b""
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10


def test_reload_leaves_idle_connections_for_their_next_request() -> None:
    with server("--workers", "1") as (proc, port):
        with idle_connection(port) as conn:
            [old] = _worker_pids(proc.pid)
            proc.send_signal(signal.SIGHUP)
            # The old worker retires (stops listening) once its replacement is ready ...
            wait_for(lambda: not _listens(old), timeout=30)
            conn.assert_open()  # ... and leaves the idle connection open
            conn.send(build_request())
            resp = conn.read_response()
            assert resp.status == 200 and resp.has_token("connection", "close")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def _listens(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False  # gone
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == LISTENER:
                return True
        except FileNotFoundError:
            continue  # closed meanwhile
    return False


def _worker_pids(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]
