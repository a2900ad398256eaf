"""uvworker under Gunicorn (issue 5): signals, recycling after max_requests, the heartbeat.

Real gunicorn processes, started by ``run_gunicorn`` from test_gunicorn.py. Every number a
test asserts is what a client sees: statuses, bytes, which worker pid answered, how long a
shutdown took.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request
from tests.test_gunicorn import HOOKS, WORKERS, run_gunicorn
from uvworker.protocols.http import EAGER_ABOVE


@pytest.mark.parametrize("worker_class", WORKERS)
def test_max_requests_is_an_exact_budget_ending_with_connection_close(
    tmp_path: Path, worker_class: str
) -> None:
    with run_gunicorn(tmp_path, worker_class, "max_requests = 5\n") as server:
        with Conn.open("127.0.0.1", server.port) as conn:
            pids = []
            for number in range(1, 6):
                conn.send(build_request())
                response = conn.read_response()
                pids.append(json.loads(response.body)["pid"])
                assert response.has_token("connection", "close") == (number == 5)
            conn.closed_within(2)
        assert len(set(pids)) == 1  # one worker served its whole budget on one connection
        assert server.info()["pid"] != pids[0]  # its replacement
        assert "Autorestarting worker after current request." in server.log


@pytest.mark.parametrize("worker_class", WORKERS)
def test_max_requests_under_keep_alive_load_fails_no_request(tmp_path: Path, worker_class: str) -> None:
    clients, per_client = 4, 100
    results: list[int | str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for _ in range(per_client):
                try:
                    response = http.get("/")
                    ok = response.status_code == 200
                    outcome: int | str = response.json()["pid"] if ok else str(response.status_code)
                except httpx.HTTPError as err:
                    outcome = f"{type(err).__name__}: {err}"
                with lock:
                    results.append(outcome)

    with run_gunicorn(tmp_path, worker_class, "max_requests = 50\n", workers=2) as server:
        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        log = server.log
    failures = [r for r in results if isinstance(r, str)]
    served = Counter(r for r in results if isinstance(r, int))
    print(f"\n{worker_class}: {len(results)} requests in {elapsed:.2f} s, {len(failures)} failed, "
          f"{len(served)} worker pids, requests per pid {sorted(served.values())}")
    assert len(results) == clients * per_client
    assert failures == [], log  # the workers' log tells which of them dropped the request
    assert len(served) >= 4  # 400 requests, budgets of 50: workers were replaced several times
    # The budget is counted as requests reach the app; the few already on their way to a
    # retiring worker (at most one per client connection) are answered too, with close.
    assert max(served.values()) <= 50 + clients


@pytest.mark.parametrize("worker_class", WORKERS)
@pytest.mark.parametrize("idle", [0, EAGER_ABOVE + 1], ids=["plain", "eager"])
def test_a_connection_accepted_in_the_turn_the_budget_ends_is_served(tmp_path: Path, worker_class: str, idle: int) -> None:
    """The budget's last request and a new connection reach the worker in one loop turn. asyncio
    accepts the connection in that turn but gives it its transport in a task the next one: the
    retirement must not close the listener in between (that dropped the socket: a reset). With
    more than EAGER_ABOVE connections open the budget's last request reaches the app inside its
    read's callback, before the listener's in the same turn: the listener must still accept
    (closed or no longer read at once, it left the newcomer to a reset)."""
    with run_gunicorn(tmp_path, worker_class, "max_requests = 3\n") as server, contextlib.ExitStack() as stack:
        for _ in range(idle):  # (accepted before ``last``, whose first answer says it was)
            stack.enter_context(Conn.open("127.0.0.1", server.port))
        with Conn.open("127.0.0.1", server.port) as last, Conn.open("127.0.0.1", server.port) as holder:
            last.send(build_request())  # 1: and this connection is surely accepted
            assert last.read_response().status == 200
            holder.send(build_request("GET", "/hold"))  # 2: blocks the worker's event loop
            wait_for(lambda: server.events("holding"))
            last.send(build_request())  # 3: the budget's last, retires the worker ...
            with Conn.open("127.0.0.1", server.port) as newcomer:  # ... seen in the same turn
                newcomer.send(build_request())
                (tmp_path / "events.go").touch()  # the loop runs again
                responses = [holder.read_response(), last.read_response(), newcomer.read_response()]
        log = server.log
    assert [r.status for r in responses] == [200, 200, 200], log
    assert responses[1].has_token("connection", "close")  # the newcomer's: from this worker or its replacement


@pytest.mark.parametrize(
    ("worker_class", "sig"),
    [(WORKERS[0], signal.SIGQUIT), (WORKERS[1], signal.SIGQUIT), (WORKERS[0], signal.SIGINT)],
)
def test_quit_and_int_are_quick_and_lifespan_shutdown_still_runs(
    tmp_path: Path, worker_class: str, sig: int
) -> None:
    with run_gunicorn(tmp_path, worker_class, HOOKS) as server:
        pid = server.info()["pid"]
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request("GET", "/slow?10"))
            wait_for(lambda: server.events("pre_request"))
            started = time.monotonic()
            server.signal(sig)
            conn.closed_within(3)  # not answered: a quick stop does not wait for it
            assert server.wait_exit(5) == 0
            quit_time = time.monotonic() - started
    print(f"\n{worker_class}: {signal.Signals(sig).name} to exit with a request in flight: {quit_time:.2f} s")
    assert quit_time < 2
    assert server.events("worker_int") == [f"worker_int {pid}"]
    assert server.events("shutdown") == [f"shutdown {pid}"]
    assert server.events("worker_exit") == [f"worker_exit {pid}"]


@pytest.mark.parametrize("worker_class", WORKERS)
def test_sigterm_finishes_in_flight_work_and_graceful_timeout_bounds_a_stream(
    tmp_path: Path, worker_class: str
) -> None:
    with run_gunicorn(tmp_path, worker_class, HOOKS + "graceful_timeout = 2\n") as server:
        pid = server.info()["pid"]
        stream = Conn.open("127.0.0.1", server.port)
        stream.send(build_request("GET", "/stream"))
        assert stream.read_head().status == 200
        slow = Conn.open("127.0.0.1", server.port)
        slow.send(build_request("GET", "/slow?0.5"))
        wait_for(lambda: any(" /slow" in line for line in server.events("pre_request")))  # in flight
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        answer = slow.read_response(timeout=3)
        assert answer.status == 200 and answer.has_token("connection", "close")
        stream.closed_within(5)
        stream_cut = time.monotonic() - started
        assert server.wait_exit(5) == 0
        exit_time = time.monotonic() - started
        stream.close()
        slow.close()
    print(f"\n{worker_class}: graceful_timeout 2 s: stream cut after {stream_cut:.2f} s, "
          f"exit after {exit_time:.2f} s")
    assert 1.2 < stream_cut < 2.5
    assert server.events("shutdown") == [f"shutdown {pid}"]  # before the arbiter's SIGKILL
    assert "was sent SIGKILL" not in server.log


@pytest.mark.parametrize("worker_class", WORKERS)
def test_blocked_event_loop_gets_the_worker_replaced_and_worker_abort_called(
    tmp_path: Path, worker_class: str
) -> None:
    with run_gunicorn(tmp_path, worker_class, HOOKS + "timeout = 2\n") as server:
        pid = server.info()["pid"]
        started = time.monotonic()
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(build_request("GET", "/block"))
            wait_for(lambda: server.events("worker_abort"), timeout=8)
            conn.read_until_close(3)
        aborted = time.monotonic() - started
        server.wait_ready(count=2)
        assert server.info()["pid"] != pid
        replaced = time.monotonic() - started
        log = server.log
    print(f"\n{worker_class}: timeout 2 s: worker_abort after {aborted:.2f} s, "
          f"replacement serving after {replaced:.2f} s")
    assert server.events("worker_abort") == [f"worker_abort {pid}"]
    assert server.events("worker_exit")[0] == f"worker_exit {pid}"  # then its replacement's, at the stop
    assert f"WORKER TIMEOUT (pid:{pid})" in log
    assert f"Worker aborted (pid: {pid}); the main thread was here:" in log
    assert "in stuck_here" in log  # the Python stack, through Gunicorn's error log
    assert 'File "' in log.split("Fatal Python error: Aborted")[1]  # faulthandler's C-level dump


def test_usr1_reopens_the_access_log(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    with run_gunicorn(tmp_path, conf=f"accesslog = {str(access)!r}\n") as server:
        server.get("/before")
        wait_for(lambda: "/before" in access.read_text())
        access.rename(tmp_path / "access.log.1")  # what logrotate does
        server.signal(signal.SIGUSR1)  # the arbiter passes it on to its workers
        wait_for(lambda: access.exists())
        server.get("/after")
        wait_for(lambda: "/after" in access.read_text())
    assert "/after" not in (tmp_path / "access.log.1").read_text()


def test_parent_death_retires_the_worker(tmp_path: Path) -> None:
    with run_gunicorn(tmp_path, conf=HOOKS) as server:
        pid = server.info()["pid"]
        os.kill(server.proc.pid, signal.SIGKILL)  # the master dies without telling its worker
        server.proc.wait(5)

        def gone() -> bool:  # exited (a zombie until its new parent reaps it)
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True

        wait_for(gone, timeout=5)
    assert server.events("shutdown") == [f"shutdown {pid}"]
    assert "Parent changed, shutting down" in server.log
