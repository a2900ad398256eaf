"""--shutdown-delay (issue 13, item 2): on SIGTERM /readyz says 503 at once while the server goes
on accepting and serving normally for the delay, then drains. A client that stops sending new
requests when /readyz says 503 (as a load balancer does) loses none. Real processes, real signals,
one-process and supervised, both parsers."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PARSERS, wait_for
from tests.test_metrics import Uvworker, start  # noqa: F401 - the fixture

DELAY = 5.0  # long enough for the checks below on a busy machine; the test waits for no part of it


@pytest.mark.parametrize("http", PARSERS)
@pytest.mark.parametrize("mode", [[], ["--workers", "2"]], ids=["one-process", "supervised"])
def test_readyz_flips_at_once_and_requests_go_on_until_the_delay_ends(start: Any, http: str, mode: list[str]) -> None:
    server: Uvworker = start("--http", http, "--shutdown-delay", str(DELAY), *mode)
    wait_for(lambda: server.probe("/readyz") == 200, timeout=20)
    answered = 0
    errors: list[BaseException] = []
    flipped = threading.Event()

    def balancer() -> None:
        """Sends requests (each on a new connection, as from many clients) until /readyz says 503."""
        nonlocal answered
        try:
            while not flipped.is_set():
                assert httpx.get(server.url + "/", timeout=10).status_code == 200
                answered += 1
                if server.probe("/readyz") == 503:
                    flipped.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=balancer, daemon=True)
    thread.start()
    wait_for(lambda: answered >= 5, timeout=20)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    thread.join(timeout=20)
    assert not errors, errors
    assert flipped.is_set()
    # Still serving normally during the delay: new connections and keep-alive ones.
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/").status_code == 200
    assert server.probe("/livez") == 200 and server.probe("/readyz") == 503
    assert time.monotonic() - signalled < DELAY, "the checks took longer than the delay: not conclusive"
    assert server.proc.poll() is None
    # Then the drain: the process exits on its own, after the delay.
    assert server.proc.wait(timeout=DELAY + 20) == 0
    assert time.monotonic() - signalled >= DELAY - 0.5


def test_a_second_sigterm_drains_at_once(start: Any) -> None:
    server: Uvworker = start("--workers", "1", "--shutdown-delay", "60")
    wait_for(lambda: server.probe("/readyz") == 200, timeout=20)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: server.probe("/readyz") == 503, timeout=10)
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0  # long before the 60 s


def test_without_a_delay_sigterm_stops_as_before(start: Any, tmp_path: Path) -> None:
    server: Uvworker = start("--workers", "1")
    wait_for(lambda: server.probe("/readyz") == 200, timeout=20)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
