"""Gunicorn's signals with our worker class, compared with Gunicorn's own gthread worker.

Real gunicorn processes (``run_gunicorn`` from test_gunicorn.py); what is asserted is what a
client sees.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.http_client import Conn, build_request
from tests.conftest import wait_for
from tests.test_gunicorn import REPO, WORKERS, run_gunicorn


@pytest.mark.parametrize("worker_class", WORKERS)
def test_term_closes_an_idle_keep_alive_connection_after_a_short_linger(tmp_path: Path, worker_class: str) -> None:
    """With a long keepalive, TERM (a shutdown's or a reload's: the worker cannot tell) closes
    an idle connection after 2 s, as gthread does, not at the graceful timeout's end: the
    arbiter waits for old workers during a reload."""
    with run_gunicorn(tmp_path, worker_class, "keepalive = 30\ngraceful_timeout = 12\n") as server:
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request())
            assert conn.read_response().status == 200
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            conn.closed_within(8)
            closed = time.monotonic() - started
            assert server.wait_exit(8) == 0
            exited = time.monotonic() - started
    print(f"\n{worker_class}: idle keep-alive connection closed {closed:.2f} s after TERM, exit {exited:.2f} s")
    assert 1.0 < closed < 5
    assert exited < 7


@pytest.mark.parametrize("worker_class", WORKERS)
def test_post_request_gets_the_request_object_pre_request_got(tmp_path: Path, worker_class: str) -> None:
    """Gunicorn hands pre_request and post_request the same ``req``: a hook that notes a start
    time on it in pre_request reads it back in post_request (a common timing recipe)."""
    conf = """
        import os, time

        def pre_request(worker, req):
            req.started = time.monotonic()

        def post_request(worker, req, environ, resp):
            took = time.monotonic() - req.started
            with open(os.environ["EVENTS"], "a") as events:
                events.write(f"took {req.path} {resp.status_code} {took:.3f}\\n")
        """
    with run_gunicorn(tmp_path, worker_class, conf) as server:
        assert server.get("/a").status_code == 200
        assert server.get("/slow?0.2").status_code == 200
        failed = "Exception in post_request hook"
        wait_for(lambda: len(server.events("took")) == 2 or failed in server.log)
        assert failed not in server.log, server.log
        lines = server.events("took")
    (a, a_status, _), (slow, slow_status, slow_took) = (line.split()[1:] for line in lines)
    assert (a, a_status, slow, slow_status) == ("/a", "200", "/slow", "200")
    assert float(slow_took) >= 0.2


@pytest.mark.parametrize("worker_class", WORKERS)
def test_worker_nr_counts_requests_for_the_hooks(tmp_path: Path, worker_class: str) -> None:
    """Gunicorn's workers count every request in ``worker.nr`` (after pre_request, before the
    app), with or without max_requests: hooks read it to log or to recycle on their own."""
    conf = """
        import os

        def _record(line):
            with open(os.environ["EVENTS"], "a") as events:
                events.write(line + "\\n")

        def pre_request(worker, req):
            _record(f"pre {req.path} {worker.nr}")

        def post_request(worker, req, environ, resp):
            _record(f"post {req.path} {worker.nr}")
        """
    with run_gunicorn(tmp_path, worker_class, conf) as server:
        for path in ("/a", "/b", "/c"):
            assert server.get(path).status_code == 200
        wait_for(lambda: len(server.events("post")) == 3)
    assert server.events("p") == ["pre /a 0", "post /a 1", "pre /b 1", "post /b 2", "pre /c 2", "post /c 3"]


SLOW_STARTUP = '''
import asyncio


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(4)  # loading a model, warming a cache: the event loop turns
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
'''


@pytest.mark.parametrize("worker_class", WORKERS)
def test_a_slow_lifespan_startup_is_not_a_worker_timeout(tmp_path: Path, worker_class: str) -> None:
    """The heartbeat comes from the event loop, from the start: an async lifespan startup
    longer than Gunicorn's timeout is waited for (a blocked loop is still a timeout)."""
    with run_gunicorn(tmp_path, worker_class, "timeout = 2\n", app=SLOW_STARTUP, wait=False) as server:
        server.wait_ready(timeout=15)
        assert server.get("/").status_code == 200
        assert "WORKER TIMEOUT" not in server.log


WSGI_PID_APP = '''
import os


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.parametrize("worker_class", ["gthread", *WORKERS])
def test_usr2_binary_upgrade_under_python_dash_m_gunicorn(tmp_path: Path, worker_class: str) -> None:
    """USR2 re-executes the master as ``python .../gunicorn/__main__.py`` when it was started as
    ``python -m gunicorn``: the gunicorn package directory comes first on sys.path then, and its
    ``http`` package shadows the standard library's. gthread never imports ``http`` and boots;
    our worker imports it and failed (ImportError: cannot import name 'HTTPStatus'), so the new
    master died and the upgrade with it. The new master's worker must answer once the old
    master is stopped."""
    # On a socket Gunicorn binds (a Unix socket here): one inherited as fd://N is not handed on.
    # The app's directory only as Gunicorn adds it (its chdir, first on sys.path): on
    # PYTHONPATH it would come after the gunicorn directory, whose "app" package would win.
    with run_gunicorn(tmp_path, worker_class, app=WSGI_PID_APP, wait=False, uds=tmp_path / "s",
                      env={"PYTHONPATH": str(REPO)}) as server:
        wait_for(lambda: server.get("/").status_code == 200 if "Booting worker" in server.log else False, timeout=15)
        old_worker = int(server.get("/").text)
        server.signal(signal.SIGUSR2)
        masters = lambda: [int(pid) for pid in re.findall(r"Listening at: \S+ \((\d+)\)", server.log)]  # noqa: E731
        new_master = wait_for(lambda: len(masters()) == 2 and masters()[1], timeout=15)
        try:
            # Once the new master's worker boots, stop the old generation, as an upgrade does.
            wait_for(lambda: server.log.count("Booting worker") >= 2 or not _alive(new_master), timeout=20)
            assert _alive(new_master), server.log
            server.signal(signal.SIGTERM)
            assert server.wait_exit(10) == 0
            answered = int(wait_for(lambda: server.get("/").text, timeout=10))
            assert answered != old_worker
            assert "ImportError" not in server.log, server.log
        finally:
            if _alive(new_master):
                os.kill(new_master, signal.SIGTERM)
                wait_for(lambda: not _alive(new_master), timeout=15)
