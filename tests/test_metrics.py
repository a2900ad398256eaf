"""--metrics-bind (issue 13, item 1): /metrics, /livez and /readyz on a listener of their own,
scraped with httpx from real ``uvworker`` processes, one-process and supervised.

The numbers are checked against what the clients saw: responses by status class, durations,
bytes, load shedding, WebSocket sessions open; and across workers recycled by --max-requests,
killed with SIGKILL and reloaded by SIGHUP, every counter only grows and the request total
equals the requests answered (a worker killed while idle, after its heartbeat, loses nothing).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PARSERS, wait_for

ROOT = Path(__file__).resolve().parent.parent

APP = r'''
import asyncio, os

async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(float(os.environ.get("SLOW", "1")))
    status = int(path[1:]) if path[1:].isdigit() else 200
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


class Uvworker:
    """``uvworker app:app --metrics-bind 127.0.0.1:0 ...`` on a socket the test bound (--fd)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, app: str = APP) -> None:
        (tmp / "metricsapp.py").write_text(app)
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.log_path = tmp / "server.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_")}
        environ.pop("WEB_CONCURRENCY", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvworker", "metricsapp:app", "--app-dir", str(tmp), "--no-access-log",
                 "--timeout-graceful-shutdown", "5", "--fd", str(sock.fileno()), "--metrics-bind", "127.0.0.1:0",
                 *args],
                cwd=ROOT, env={**environ, "PYTHONPATH": str(ROOT), **(env or {})}, pass_fds=[sock.fileno()],
                stdout=log, stderr=subprocess.STDOUT,
            )
        sock.close()
        found = wait_for(lambda: re.search(r"Metrics and probes on (\S+):", self.log) or self.proc.poll() is not None,
                         timeout=20)
        assert self.proc.poll() is None, self.log
        self.metrics_url = f"http://{found.group(1)}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self, accept: str | None = None) -> dict[str, float]:
        """/metrics parsed by prometheus_client's parser: {'name{label=value}': value}."""
        headers = {"accept": accept} if accept else {}
        response = httpx.get(self.metrics_url + "/metrics", headers=headers, timeout=10)
        assert response.status_code == 200
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def probe(self, path: str) -> int:
        return httpx.get(self.metrics_url + path, timeout=10).status_code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[Uvworker] = []

    def _start(*args: str, **kwargs: Any) -> Uvworker:
        server = Uvworker(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


def answered(samples: dict[str, float]) -> float:
    return sum(samples.get(f"uvworker_requests_total{{code={c}xx}}", 0) for c in range(1, 6))


@pytest.mark.parametrize("http", PARSERS)
def test_one_process_counts_what_clients_saw(start: Any, http: str) -> None:
    server = start("--http", http)
    assert server.probe("/livez") == 200 and server.probe("/readyz") == 200
    sent_body = 0
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for path, status in [("/", 200)] * 5 + [("/404", 404)] * 3 + [("/503", 503), ("/302", 302)]:
            response = client.get(path)
            assert response.status_code == status
            sent_body += len(response.content)
    with httpx.Client(base_url=server.url, timeout=10, http1=False, http2=True) as h2c:  # the same books
        for _ in range(2):
            response = h2c.get("/")
            assert response.status_code == 200 and response.http_version == "HTTP/2"
            sent_body += len(response.content)
    samples = server.scrape()
    assert samples["uvworker_requests_total{code=2xx}"] == 7
    assert samples["uvworker_requests_total{code=3xx}"] == 1
    assert samples["uvworker_requests_total{code=4xx}"] == 3
    assert samples["uvworker_requests_total{code=5xx}"] == 1
    assert samples["uvworker_request_duration_seconds_count"] == 12
    assert samples["uvworker_request_duration_seconds_bucket{le=+Inf}"] == 12
    assert 0 < samples["uvworker_request_duration_seconds_sum"] < 10
    assert samples["uvworker_bytes_sent_total"] > sent_body  # bodies and heads
    assert samples["uvworker_bytes_received_total"] >= 10 * len(b"GET / HTTP/1.1\r\n\r\n")
    assert samples["uvworker_workers{state=serving}"] == 1
    assert samples[f"uvworker_worker_memory_bytes{{pid={server.proc.pid},worker=1}}"] > 1 << 20
    assert samples["process_resident_memory_bytes"] > 0  # the serving process's own metrics
    assert samples["uvworker_requests_in_flight"] == 0
    # OpenMetrics when the scraper asks for it.
    response = httpx.get(server.metrics_url + "/metrics", timeout=10,
                         headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n") and "uvworker_requests_total{code=\"2xx\"} 7" in response.text
    assert httpx.get(server.metrics_url + "/nothing", timeout=10).status_code == 404
    assert httpx.post(server.metrics_url + "/metrics", timeout=10).status_code == 405


@pytest.mark.parametrize("http", PARSERS)
def test_gauges_and_shed_requests(start: Any, http: str) -> None:
    websockets = pytest.importorskip("websockets.sync.client")
    server = start("--http", http, "--limit-concurrency", "1", env={"SLOW": "30"})
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: server.scrape()["uvworker_requests_in_flight"] == 1, timeout=10)
        assert httpx.get(server.url + "/", timeout=10).status_code == 503  # over --limit-concurrency
        samples = server.scrape()
        assert samples["uvworker_requests_shed_total"] == 1
        assert samples["uvworker_connections_open"] >= 1
        # The client leaves (a reset: a FIN alone would be a half-close, still answered): its request ends.
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: server.scrape()["uvworker_requests_in_flight"] == 0, timeout=10)
    with websockets.connect(server.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        wait_for(lambda: server.scrape()["uvworker_websockets_open"] == 1, timeout=10)
        ws.send("hi")
    wait_for(lambda: server.scrape()["uvworker_websockets_open"] == 0, timeout=10)
    assert server.scrape()["uvworker_requests_total{code=1xx}"] == 1  # the session, once over


def test_supervised_totals_never_go_backwards(start: Any) -> None:
    """Scrapes while traffic flows across workers recycled by --max-requests, one SIGKILLed
    and a SIGHUP reload: every counter only grows; at rest, the total is what clients got."""
    server = start("--workers", "2", "--max-requests", "25")
    wait_for(lambda: server.scrape()["uvworker_workers{state=serving}"] == 2, timeout=20)
    assert server.probe("/readyz") == 200 and server.probe("/livez") == 200
    got = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    assert client.get("/").status_code == 200
                    got[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    counters = ("uvworker_requests_total{code=2xx}", "uvworker_request_duration_seconds_count",
                "uvworker_bytes_sent_total", "uvworker_bytes_received_total")
    last = dict.fromkeys(counters, 0.0)

    def scrape_monotonic() -> dict[str, float]:
        samples = server.scrape()
        for name in counters:
            assert samples[name] >= last[name], f"{name} went back from {last[name]} to {samples[name]}"
            last[name] = samples[name]
        return samples

    def settled() -> dict[str, float]:
        """Traffic stopped: wait for every worker's heartbeat to bring the total to ``got``."""
        return wait_for(lambda: (s := scrape_monotonic())["uvworker_requests_total{code=2xx}"] == got[0] and s,
                        timeout=15)

    def run_traffic(until: Any) -> None:
        stop.clear()
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        wait_for(lambda: scrape_monotonic() and until(), timeout=60, interval=0.2)
        stop.set()
        thread.join(timeout=20)
        assert not errors, errors

    restarts = "uvworker_worker_restarts_total{reason=%s}"
    run_traffic(lambda: server.scrape()[restarts % "max_requests"] >= 2)
    samples = settled()
    assert samples["uvworker_request_duration_seconds_count"] == got[0]

    # A worker killed while idle, after its heartbeat: its totals are kept, nothing is lost.
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    got[0] += 1
    settled()
    victim = wait_for(lambda: len(pids := children(server.proc.pid)) == 2 and pids, timeout=15).pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: scrape_monotonic()[restarts % "crash"] == 1, timeout=15)
    target = got[0] + 20
    run_traffic(lambda: last["uvworker_requests_total{code=2xx}"] >= target)
    settled()

    # A reload replaces both workers.
    server.proc.send_signal(signal.SIGHUP)
    run_traffic(lambda: server.scrape()[restarts % "reload"] >= 2)
    samples = settled()
    assert samples["uvworker_request_duration_seconds_count"] == got[0]
    assert samples["uvworker_workers{state=serving}"] == 2
    assert server.probe("/readyz") == 200


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_readyz_waits_for_a_worker(start: Any, tmp_path: Path) -> None:
    """/livez answers from the master at once; /readyz says 503 until a worker is ready."""
    gate = tmp_path / "gate"
    gate.touch()
    gated = APP.replace("import asyncio, os", "import asyncio, os, time\n"
                        "while os.path.exists(os.environ['GATE']):\n    time.sleep(0.05)")
    server = start("--workers", "1", env={"GATE": str(gate)}, app=gated)
    assert server.probe("/livez") == 200
    assert server.probe("/readyz") == 503
    assert server.scrape()["uvworker_workers{state=starting}"] == 1
    gate.unlink()
    wait_for(lambda: server.probe("/readyz") == 200, timeout=20)


@pytest.mark.parametrize("mode", [[], ["--workers", "1"]], ids=["one-process", "supervised"])
@pytest.mark.parametrize("bind, message", [
    ("nonsense", "--metrics-bind: 'nonsense' is not ADDRESS:PORT"),
    ("example.com:9000", "is not ADDRESS:PORT with an IP address"),
    ("127.0.0.1:99999", "is not ADDRESS:PORT"),
    ("unix:", "is not unix:PATH with a path"),
])
def test_a_bad_metrics_bind_is_one_line_and_exit_2(tmp_path: Path, mode: list[str], bind: str, message: str) -> None:
    (tmp_path / "metricsapp.py").write_text(APP)
    result = subprocess.run(
        [sys.executable, "-m", "uvworker", "metricsapp:app", "--app-dir", str(tmp_path), "--port", "0",
         "--metrics-bind", bind, *mode], cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("mode", [[], ["--workers", "1"]], ids=["one-process", "supervised"])
def test_a_metrics_port_in_use_is_one_line_and_exit_1(tmp_path: Path, mode: list[str]) -> None:
    (tmp_path / "metricsapp.py").write_text(APP)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "uvworker", "metricsapp:app", "--app-dir", str(tmp_path), "--port", "0",
             "--metrics-bind", f"127.0.0.1:{port}", *mode], cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"uvworker: error: --metrics-bind: cannot listen on 127.0.0.1:{port}: Address already in use"], \
        result.stderr


def test_metrics_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    (tmp_path / "metricsapp.py").write_text(APP)
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "metricsapp:app", "--app-dir", str(tmp_path), "--no-access-log",
         "--fd", str(sock.fileno()), "--workers", "1", "--metrics-bind", f"unix:{path}"],
        cwd=ROOT, pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    sock.close()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=10) as scraper:
            wait_for(lambda: path.exists() and _ready(scraper), timeout=20)
            assert httpx.get(url, timeout=10).status_code == 200
            wait_for(lambda: "uvworker_requests_total{code=\"2xx\"} 1.0" in scraper.get("http://m/metrics").text,
                     timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert not path.exists()  # removed at exit


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("http://m/readyz").status_code == 200
    except httpx.HTTPError:
        return False
