"""The server's heap under request bodies (uvworker/malloc.py), in a real server process.

Bodies of tens of kilobytes come and go with every request. With glibc's defaults the heap
is trimmed and regrown all the time and each new body pays page faults for fresh pages; the
server keeps a bounded pad of free heap instead. What the tests see is the server process's
own count of minor page faults (/proc/<pid>/stat) while many 64 KiB POSTs are in flight.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.http_client import Conn, build_request, read_body, respond
from tests.test_cli import listening, running

BODY = b"x" * 65536
CONNECTIONS, ROUNDS = 16, 40

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="needs Linux with glibc",
)


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def post_rounds(port: int, rounds: int) -> None:
    """``rounds`` times: a 64 KiB POST on each of CONNECTIONS keep-alive connections at once."""
    conns = [Conn.open("127.0.0.1", port) for _ in range(CONNECTIONS)]
    request = build_request("POST", body=BODY)
    try:
        for _ in range(rounds):
            for conn in conns:
                conn.send(request)
            for conn in conns:
                response = conn.read_response(timeout=10)
                assert (response.status, response.body) == (200, b"65536")
    finally:
        for conn in conns:
            conn.close()


def faults_per_request(parser: str, env: dict[str, str] | None = None) -> float:
    with listening() as sock:
        fd = sock.fileno()
        port = sock.getsockname()[1]
        app = "tests.test_malloc:app"
        with running(app, "--fd", str(fd), "--http", parser, "--no-access-log", env=env, pass_fds=[fd]) as proc:
            post_rounds(port, 2)  # warm up: imports, first buffers
            before = minor_faults(proc.pid)
            post_rounds(port, ROUNDS)
            return (minor_faults(proc.pid) - before) / (CONNECTIONS * ROUNDS)


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "http":
        await respond(send, body=b"%d" % len(await read_body(receive)))


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_bodies_do_not_make_the_heap_churn(parser: str) -> None:
    assert faults_per_request(parser) < 2


def test_the_operators_malloc_settings_win() -> None:
    """MALLOC_TOP_PAD_=0 in the environment: glibc's own behaviour, which faults per body.

    How many faults glibc's own trimming costs varies with the machine (4.4 per request here,
    3.7 on CI), so the untuned server is compared with the tuned one in the same run: had the
    server applied its pad over the operator's setting, the two would be alike.
    """
    tuned = faults_per_request("httptools")
    untuned = faults_per_request("httptools", {"MALLOC_TOP_PAD_": "0"})
    assert untuned > max(3 * tuned, 1.5), (tuned, untuned)
