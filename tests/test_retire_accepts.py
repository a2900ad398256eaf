"""A worker that starts retiring in the loop turn in which it accepted a connection serves it.

asyncio's event loop accepts a connection in one turn and builds its transport in a task
the next; a retirement that closed the listening socket in between made asyncio drop the
accepted socket, and the client, which had sent its request, got a reset (seen as a flaky
max-requests test). Server._stop_accepting now stops the accepting at once and closes the
listeners a turn later. uvloop builds the transport as it accepts (the control case).

To make both events land in one turn, the app blocks the worker's event loop (``/hold``)
while the test makes the worker retire (SIGTERM to the worker, which retires it at once)
and opens a new connection with a request; then it lets the loop run. Standalone here; the
Gunicorn shape (max_requests) is in test_gunicorn_lifecycle.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request

REPO = Path(__file__).resolve().parent.parent

APP = '''
import os, time


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/hold":  # blocks the event loop until the file EVENTS.<query> exists
        go = os.environ["EVENTS"] + "." + scope["query_string"].decode()
        with open(os.environ["EVENTS"], "a") as events:
            events.write(f"holding {os.getpid()}\\n")
        deadline = time.monotonic() + 10
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.005)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
'''


def delivered(pid: int, sig: int) -> bool:
    """Whether ``sig`` is no longer pending for ``pid``: its handler has run."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return not any(mask & (1 << (sig - 1)) for mask in pending)


@pytest.mark.parametrize(("loop", "http"), [("asyncio", "h11"), ("asyncio", "httptools"), ("uvloop", "httptools")])
def test_connection_accepted_as_the_worker_retires_is_served(tmp_path: Path, loop: str, http: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    events = tmp_path / "events"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "EVENTS": str(events)}
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "app:app", "--fd", str(sock.fileno()), "--workers", "1",
             "--loop", loop, "--http", http],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
    sock.close()
    answers = []
    try:
        for round in range(1, 4):
            with Conn.open("127.0.0.1", port) as holder:
                holder.send(build_request("GET", f"/hold?{round}"))  # served by this round's worker
                line = wait_for(lambda: (lines := events.read_text().splitlines() if events.exists() else [])
                                and len(lines) == round and lines[-1], timeout=10)
                pid = int(line.split()[1])
                os.kill(pid, signal.SIGTERM)  # retires at once, in the next turn ...
                wait_for(lambda: delivered(pid, signal.SIGTERM))  # its wakeup byte is in before:
                with Conn.open("127.0.0.1", port) as newcomer:  # ... in which this is accepted
                    newcomer.send(build_request())
                    (tmp_path / f"events.{round}").touch()
                    answers += [holder.read_response(timeout=10), newcomer.read_response(timeout=10)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert [answer.status for answer in answers] == [200] * 6, (tmp_path / "log").read_text()
