"""The standalone server's signals as a user at a terminal sees them: real processes, real
signals; what is asserted is the exit (code and time) and the log lines."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.test_cli import environment

# A lifespan that never answers startup (a database that is down), or never finishes shutdown;
# it notes in EVENTS when it is cancelled.
HANGING_LIFESPAN = """
import asyncio, os

async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    await receive()
    if os.environ["HANG"] == "shutdown":
        await send({"type": "lifespan.startup.complete"})
        await receive()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with open(os.environ["EVENTS"], "a") as events:
            events.write("cancelled\\n")
        if os.environ.get("STUBBORN"):  # ignores the cancellation too
            await asyncio.sleep(60)
        raise
"""


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_second_signal_stops_a_lifespan_that_hangs(tmp_path: Path, phase: str, sig: signal.Signals) -> None:
    """Without --workers: Ctrl-C (or TERM) once waits for the app's lifespan, as uvicorn does;
    a second one stops the wait (the lifespan task is cancelled) instead of leaving the
    process to kill -9."""
    (tmp_path / "hanging.py").write_text(HANGING_LIFESPAN)
    events = tmp_path / "events"
    env = environment({"PYTHONPATH": str(tmp_path), "HANG": phase, "EVENTS": str(events)})
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvworker", "hanging:app", "--port", "0"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        text = lambda: (tmp_path / "log").read_text()  # noqa: E731
        wait_for(lambda: "Listening on" in text() if phase == "shutdown" else "startup." in text(), timeout=10)
        proc.send_signal(sig)
        if phase == "shutdown":
            wait_for(lambda: "Waiting for application shutdown." in text())
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(0.5)  # one signal waits for the startup
        started = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(5)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, text()
    assert took < 2, took
    assert events.read_text() == "cancelled\n"
    assert f"Application {phase} cancelled" in text()


@contextlib.contextmanager
def _hanging(tmp_path: Path, *args: str, stubborn: bool = False) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """``uvworker hanging:app *args`` (lifespan shutdown never answers), in a session of its
    own, serving; yields it and a function returning its log."""
    (tmp_path / "hanging.py").write_text(HANGING_LIFESPAN)
    env = environment({"PYTHONPATH": str(tmp_path), "HANG": "shutdown", "EVENTS": str(tmp_path / "events"),
                       **({"STUBBORN": "1"} if stubborn else {})})
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvworker", "hanging:app", "--port", "0", *args],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    text = lambda: (tmp_path / "log").read_text()  # noqa: E731
    try:
        wait_for(lambda: "Listening on" in text(), timeout=15)
        yield proc, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
            proc.wait()


@pytest.mark.parametrize(("args", "sig"), [((), signal.SIGQUIT), (("--workers", "1"), signal.SIGQUIT),
                                           (("--workers", "1"), signal.SIGINT)], ids=["QUIT", "workers-QUIT", "workers-INT"])
def test_a_quick_stop_does_not_wait_long_for_a_lifespan_shutdown_that_hangs(
    tmp_path: Path, args: tuple[str, ...], sig: signal.Signals
) -> None:
    """QUIT (and INT to the master of --workers) is the quick stop: lifespan shutdown still runs,
    but for 2 s at most, then its task is cancelled. Before, one QUIT without --workers waited
    for the app as long as it hung, and with --workers the master killed the worker only after
    the graceful timeout and 3 s more (33 s by default)."""
    with _hanging(tmp_path, *args) as (proc, text):
        started = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(15)
        took = time.monotonic() - started
    print(f"\n{' '.join(args) or 'single process'}: {sig.name} to exit, lifespan shutdown hanging: {took:.2f} s")
    assert code == 0, text()
    assert "Waiting for application shutdown." in text()
    assert "Application shutdown cancelled" in text()
    assert (tmp_path / "events").read_text() == "cancelled\n"
    assert took < 6, text()


@pytest.mark.parametrize(("first", "second"), [(signal.SIGQUIT, signal.SIGQUIT), (signal.SIGQUIT, signal.SIGINT),
                                               (signal.SIGINT, signal.SIGQUIT)], ids=["QUIT-QUIT", "QUIT-INT", "INT-QUIT"])
def test_a_second_quick_stop_signal_kills_the_workers_at_once(
    tmp_path: Path, first: signal.Signals, second: signal.Signals
) -> None:
    """With --workers, a second INT or QUIT while the quick stop waits (here for an app whose
    lifespan shutdown ignores even the cancellation) kills the workers at once. Before, only
    INT then INT did; QUIT then anything waited the graceful timeout and 3 s more."""
    with _hanging(tmp_path, "--workers", "1", stubborn=True) as (proc, text):
        proc.send_signal(first)
        wait_for(lambda: "Application shutdown cancelled" in text(), timeout=10)
        started = time.monotonic()
        proc.send_signal(second)
        code = proc.wait(15)
        took = time.monotonic() - started
    assert code == 0, text()
    assert f"Second {second.name}: killing the workers now." in text()
    assert took < 2, text()


def _get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@contextlib.contextmanager
def _supervised(
    tmp_path: Path, *args: str, own_session: bool = True, fd: bool = True
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``uvworker examples.hello:app *args``, with ``fd``: on a socket bound here; yields it and
    that port (0 without). In a session of its own, or (``own_session`` false) as a shell's
    job: in a process group of its own whose parent, this test, is in the same session."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_server(("127.0.0.1", 0))) if fd else None
        fds = [sock.fileno()] if sock is not None else []
        with open(tmp_path / "log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvworker", "examples.hello:app", *[f"--fd={n}" for n in fds], *args],
                cwd=Path(__file__).resolve().parent.parent, env=environment(), stdout=log,
                stderr=subprocess.STDOUT, pass_fds=fds,
                **({"start_new_session": True} if own_session else {"process_group": 0}),
            )
        port = sock.getsockname()[1] if sock is not None else 0
    try:
        yield proc, port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
            proc.wait()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("shape", ["fork", "preload", "reload"])
def test_ttin_and_ttou_to_the_whole_process_group_leave_the_workers_running(tmp_path: Path, shape: str) -> None:
    """``pkill -TTIN uvworker`` or a signal to the process group reaches the workers (and the
    --reload watcher) too: the master scales, and the others, whose default action for TTIN
    and TTOU is to stop, must go on. (The group is started as a shell's job is, with its
    parent in the same session: the kernel stops an orphaned group, a session of its own, on
    neither.)"""
    extra = {"fork": [], "preload": ["--preload"], "reload": ["--reload", "--reload-dir", str(tmp_path)]}[shape]
    text = lambda: (tmp_path / "log").read_text()  # noqa: E731
    with _supervised(tmp_path, "--workers", "1", *extra, own_session=False) as (proc, port):
        wait_for(lambda: "Worker 1 (pid" in text(), timeout=10)
        os.killpg(proc.pid, signal.SIGTTIN)
        second = int(wait_for(lambda: re.search(r"Worker 2 \(pid (\d+)\) is ready", text()), timeout=10)[1])
        os.killpg(proc.pid, signal.SIGTTOU)  # the master retires worker 2; worker 1 serves alone
        wait_for(lambda: f"Worker 2 (pid {second}) exited" in text(), timeout=10)
        assert [_state(pid) for pid in _children(proc.pid) if _state(pid) == "T"] == [], text()
        assert _get(port) == 200


def test_workers_stopped_and_continued_with_the_master_are_not_taken_for_hung(tmp_path: Path) -> None:
    """Ctrl-Z then fg, or docker pause then unpause, stops the master and its workers alike
    for longer than --timeout-worker: once continued, the workers serve on; before, the
    master aborted every one of them as hung at its first look."""
    text = lambda: (tmp_path / "log").read_text()  # noqa: E731
    with _supervised(tmp_path, "--workers", "2", "--timeout-worker", "2", own_session=True) as (proc, port):
        wait_for(lambda: "Ready: 2 worker(s) serving." in text(), timeout=10)
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(3)  # the freeze itself: longer than --timeout-worker
        os.killpg(proc.pid, signal.SIGCONT)
        watch_until = time.monotonic() + 2.5  # the master looks at once, the workers beat each second
        while time.monotonic() < watch_until:
            assert _get(port) == 200
            assert "sent no heartbeat" not in text() and "found hung" not in text(), text()
            assert "has not turned" not in text(), text()  # nor does a worker's watchdog report
            time.sleep(0.1)
        assert "The master did not run for" in text()


@pytest.mark.parametrize(("umask", "mode"), [(None, 0o666), ("007", 0o660), ("077", 0o600)])
def test_umask_applies_to_the_unix_socket(tmp_path: Path, umask: str | None, mode: int) -> None:
    """--uds is connectable by every user (uvicorn's 0666) unless --umask says otherwise, as
    Gunicorn's umask does for its unix: binds: 007 keeps the socket to its owner and group."""
    path = tmp_path / "app.sock"
    args = ["--workers", "1", "--uds", str(path), *(["--umask", umask] if umask else [])]
    with _supervised(tmp_path, *args, fd=False):
        wait_for(lambda: "Ready: 1 worker(s) serving." in (tmp_path / "log").read_text(), timeout=10)
        assert stat.S_IMODE(path.stat().st_mode) == mode
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_user_and_group_own_the_unix_socket(tmp_path: Path) -> None:
    """With --user/--group the socket belongs to them, as Gunicorn chowns its unix: binds, so
    that --umask 007 leaves it to the workers' user and the front proxy's group."""
    import grp
    import pwd

    path = tmp_path / "app.sock"
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    args = ["--workers", "1", "--uds", str(path), "--umask", "007", "--user", "nobody", "--group", "nogroup"]
    with _supervised(tmp_path, *args, fd=False):
        wait_for(lambda: "Ready: 1 worker(s) serving." in (tmp_path / "log").read_text(), timeout=10)
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (nobody, nogroup, 0o660)
    assert not path.exists()
