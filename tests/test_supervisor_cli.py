"""uvworker's supervisor mode through the real CLI (``python -m uvworker app:app --workers 2``),
with real signals, keep-alive client load, a fake $NOTIFY_SOCKET and socket activation (issue 6)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_supervisor import FakeSystemd, alive
from uvworker.cli import parse
from uvworker.config import Config
from uvworker.prefork import wanted

ROOT = Path(__file__).resolve().parent.parent

APP = r'''
import os, time
time.sleep(float(os.environ.get("APP_IMPORT_DELAY", "0")))
if os.path.exists(os.environ.get("APP_BROKEN_FLAG", "/nonexistent")):
    raise RuntimeError("deliberately broken deploy")
LEAK = []
with open(os.environ["APP_IMPORT_LOG"], "a") as log:
    log.write(f"{os.getpid()}\n")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/leak":
        LEAK.append(os.urandom(1 << 20))
    if scope["path"] == "/block":
        time.sleep(60)  # blocks the event loop: no more heartbeats
    if scope["path"] == "/sleep":
        import asyncio
        open(os.environ["APP_IMPORT_LOG"] + ".sleeping", "w").close()
        await asyncio.sleep(1)
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''

CLEAN_ENV = ("WEB_CONCURRENCY", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
             "WATCHDOG_USEC", "FORWARDED_ALLOW_IPS")


class Served:
    """``uvworker app:app`` in supervisor mode on a socket this test bound (``--fd``)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, systemd: bool = False,
                 app: str = APP) -> None:
        (tmp / "svapp.py").write_text(app)
        self.tmp = tmp
        self.broken_flag = tmp / "broken"
        self.import_log = tmp / "imports"
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k not in CLEAN_ENV}
        full_env |= {"APP_BROKEN_FLAG": str(self.broken_flag), "APP_IMPORT_LOG": str(self.import_log),
                     "PYTHONPATH": str(ROOT)} | (env or {})
        fd = self.sock.fileno()
        argv = [sys.executable, "-m", "uvworker", "svapp:app", "--app-dir", str(tmp), "--no-access-log",
                "--timeout-graceful-shutdown", "5", *args]
        preexec = None
        if systemd:
            def preexec() -> None:
                os.dup2(fd, 3)

            argv = ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *argv]
            pass_fds = [3]
        else:
            argv += ["--fd", str(fd)]
            pass_fds = [fd]
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, pass_fds=pass_fds, preexec_fn=preexec,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.sock.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        try:
            wait_for(lambda: text in self.log, timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not in the log:\n{self.log}") from None

    def get(self, path: str = "/") -> int:
        response = httpx.get(self.url + path.lstrip("/"), timeout=5)
        assert response.status_code == 200
        return int(response.text.split()[0])  # the pid (an app may say more after it)

    def try_get(self) -> int | None:
        try:
            return self.get()
        except (httpx.HTTPError, AssertionError):
            return None

    def workers(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def serving_pids(self, count: int, timeout: float = 10.0) -> set[int]:
        seen: set[int] = set()

        def enough() -> bool:
            pid = self.try_get()
            if pid:
                seen.add(pid)
            return len(seen) >= count

        wait_for(enough, timeout)
        return seen

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, **kwargs: Any) -> Served:
        server = Served(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        leftovers = server.workers() if server.proc.poll() is None else set()
        server.stop()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class KeepAliveLoad:
    """Clients in threads, each on one keep-alive connection, sending requests back to back."""

    def __init__(self, url: str, clients: int = 4, path: str = "", http2: bool = False, pause: float = 0.0) -> None:
        self.url = url + path
        self.pause = pause  # seconds each client waits between two requests
        self.http2 = http2  # HTTP/2 by prior knowledge (h2c), one connection per client
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.served: Counter[int] = Counter()  # answers per worker pid
        self.bodies: Counter[str] = Counter()  # answers per what follows the pid (e.g. a version)
        self.longest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10, http1=not self.http2, http2=self.http2) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.get(self.url)
                    if response.status_code != 200:
                        raise RuntimeError(f"status {response.status_code}")
                except Exception as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                elapsed = time.monotonic() - started
                with self._lock:
                    self.ok += 1
                    self.longest = max(self.longest, elapsed)
                    self.pids.add(int(response.text.split()[0]))
                    self.served[int(response.text.split()[0])] += 1
                    self.bodies[response.text.split(" ", 1)[-1]] += 1
                if self.pause:
                    self._stop.wait(self.pause)

    def finished(self) -> dict[int, int]:
        """Answers per worker that has exited."""
        with self._lock:
            served = dict(self.served)
        return {pid: n for pid, n in served.items() if not alive(pid)}

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def test_supervisor_mode_is_chosen_by_workers_recycling_or_systemd() -> None:
    def config(*argv: str) -> Config:
        return Config(**parse(["app:app", *argv], {}))

    assert not wanted(config(), {})
    assert wanted(config("--workers", "1"), {})  # one supervised worker, restarted when it dies
    assert wanted(config("--limit-max-requests", "50"), {})
    assert config("--limit-max-requests", "50", "--limit-max-requests-jitter", "5").max_requests_jitter == 5
    assert wanted(config("--max-memory", "200"), {})
    assert wanted(config(), {"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert Config(**parse(["app:app"], {"WEB_CONCURRENCY": "3"})).workers == 3


def test_hup_under_keepalive_load_fails_no_request(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", env={"APP_IMPORT_DELAY": "0.5"})
    old = server.serving_pids(2)
    load = KeepAliveLoad(server.url)
    wait_for(lambda: load.ok > 50)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("Reload complete")
    wait_for(lambda: server.workers().isdisjoint(old))  # the old ones drained and exited
    answered = load.ok
    wait_for(lambda: load.ok > answered + 50)  # the clients go on, on the new workers
    load.stop()
    assert load.failures == []
    assert server.serving_pids(2).isdisjoint(old)
    assert server.stop() == 0


def test_hup_with_a_broken_deploy_keeps_the_old_workers(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    old = server.serving_pids(2)
    server.broken_flag.write_text("")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("Reload failed")
    assert "deliberately broken deploy" in server.log
    assert server.workers() == old
    assert server.get() in old


def test_max_requests_recycles_two_workers_without_failures(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", "--max-requests", "50", "--max-requests-jitter", "10")
    first = server.serving_pids(2)
    load = KeepAliveLoad(server.url)
    wait_for(lambda: len(load.pids - first) >= 3, timeout=15)  # several generations served
    load.stop()
    assert load.failures == []
    assert "Recycling worker" in server.log


@pytest.mark.parametrize("limit", [25, 50])
def test_max_requests_bound_holds_under_keepalive_load(served: Callable[..., Served], limit: int) -> None:
    """A worker serves at most its limit plus one request per client connection (the one in
    flight, or the next one, answered with Connection: close), and none fails. The budgets
    last less than a replacement takes to boot (8 unpaced clients): a worker at its limit
    stops accepting all the same, and its clients' new connections wait for the other worker
    or the replacement."""
    clients = 8
    server = served("--workers", "2", "--max-requests", str(limit))
    server.serving_pids(2)
    load = KeepAliveLoad(server.url, clients=clients)
    wait_for(lambda: len(load.finished()) >= 6, timeout=60)
    load.stop()
    assert load.failures == []
    gone = load.finished()
    assert max(gone.values()) <= limit + clients, (gone, server.log)


def test_recycling_with_a_broken_deploy_keeps_the_old_workers_serving(served: Callable[..., Served]) -> None:
    """Every replacement fails to import: the workers at their budget serve on (never zero)."""
    limit, clients = 25, 4
    server = served("--workers", "2", "--max-requests", str(limit))
    server.serving_pids(2)
    server.broken_flag.write_text("")  # (a replacement asked for before this one may still start)
    load = KeepAliveLoad(server.url, clients=clients)
    server.wait_log("keeps serving and will be replaced later", timeout=30)

    def served_on() -> int | None:  # past its bound: told to serve on (holding at its limit, or before)
        return next((pid for pid, n in load.served.items() if n > limit + clients + 100), None)

    pid = wait_for(served_on, timeout=20)
    load.stop()
    assert load.failures == [] and alive(pid)
    assert "deliberately broken deploy" in server.log


LEAK_SITE = f"svapp.py:{APP.splitlines().index('        LEAK.append(os.urandom(1 << 20))') + 1}"


def test_max_memory_recycles_a_leaking_worker_and_reports_where_it_grew(served: Callable[..., Served]) -> None:
    server = served("--workers", "1", "--max-memory", "40", "--trace-memory", "1")
    first = server.get()
    for _ in range(60):
        server.get("/leak")
    server.wait_log("MiB, limit 40 MiB")
    wait_for(lambda: server.try_get() not in (first, None))
    server.wait_log(LEAK_SITE)
    report = server.log[server.log.index("Memory grown since"):]
    top = report.splitlines()[1]  # the site holding the most: the leak, 1 MiB per request
    assert top.endswith(LEAK_SITE) and float(top.split()[1]) >= 40, report


def test_usr2_logs_each_workers_memory_report(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", "--trace-memory", "3")
    pids = server.serving_pids(2)
    for _ in range(4):
        server.get("/leak")
    server.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: server.log.count("Memory grown since") == 2)
    server.wait_log(LEAK_SITE)
    assert "from " in server.log  # three frames: the callers of the leaking line too
    assert server.serving_pids(2) == pids == server.workers()


def test_usr2_without_trace_memory_says_how_to_turn_it_on(served: Callable[..., Served]) -> None:
    server = served("--workers", "1")
    pid = server.get()
    server.proc.send_signal(signal.SIGUSR2)
    server.wait_log("Memory tracing is off: start the server with --trace-memory")
    assert server.get() == pid


def test_killed_worker_is_replaced(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    pids = server.serving_pids(2)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(server.workers() - pids) == 1)
    survivors = server.serving_pids(2)
    assert victim not in survivors


def test_ttou_and_term_while_workers_import(served: Callable[..., Served]) -> None:
    """SIGTTOU, then SIGTERM, while the workers still import the app: each is stopped at once
    (it has no handler yet) and the log says so. Before, it said "was killed by SIGHUP after
    retiring (0 request(s) served)", as if the worker had served and failed to leave."""
    server = served("--workers", "2", env={"APP_IMPORT_DELAY": "60"})
    wait_for(lambda: len(server.workers()) == 2, timeout=10)
    server.proc.send_signal(signal.SIGTTOU)
    server.wait_log("was stopped before it was ready (SIGTTOU); it was killed by SIGHUP.")
    server.proc.send_signal(signal.SIGTERM)
    server.wait_log("was stopped before it was ready (the master stops); it was killed by SIGTERM.")
    server.proc.wait(10)
    assert "after retiring" not in server.log, server.log


def test_a_worker_takes_every_term_as_graceful(served: Callable[..., Served]) -> None:
    """A second TERM (the master's retirement crossing the worker's own) never cuts a request."""
    server = served("--workers", "1")
    pid = server.get()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(httpx.get(server.url + "sleep", timeout=10).status_code))
    thread.start()
    wait_for(Path(f"{server.import_log}.sleeping").exists)  # the request is in flight
    os.kill(pid, signal.SIGTERM)
    server.wait_log("Shutting down: 1 connection(s) open")  # retiring, its request in flight
    os.kill(pid, signal.SIGTERM)
    thread.join(10)
    assert result == [200]
    server.wait_log(f"(pid {pid}) exited with code 0 after retiring")
    assert server.get() != pid  # replaced


def test_notify_sequence_with_socket_activation(served: Callable[..., Served], tmp_path: Path) -> None:
    fake = FakeSystemd(tmp_path)
    server = served("--workers", "2", systemd=True,
                    env={"NOTIFY_SOCKET": fake.path, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http",
                         "APP_IMPORT_DELAY": "0.3"})
    ready = fake.wait("READY=1")
    assert server.get()  # READY=1 means answering now
    assert f"MAINPID={server.proc.pid}" in fake.messages[ready][1]
    assert "socket(s) from systemd: http" in server.log
    server.proc.send_signal(signal.SIGHUP)
    reloading = fake.wait("RELOADING=1", after=ready + 1)
    assert "MONOTONIC_USEC=" in fake.messages[reloading][1]
    fake.wait("READY=1", after=reloading + 1)
    assert server.stop() == 0
    fake.wait("STOPPING=1", after=reloading + 1)


def test_startup_crash_loop_exits_3(served: Callable[..., Served], tmp_path: Path) -> None:
    (tmp_path / "broken").write_text("")
    server = served("--workers", "2")
    assert server.proc.wait(20) == 3
    assert "deliberately broken deploy" in server.log
    assert server.log.count("keep failing before they are ready") == 1
    assert "Traceback" not in server.log


def test_hung_worker_is_aborted_with_its_stack_and_replaced(served: Callable[..., Served]) -> None:
    server = served("--workers", "1", "--timeout-worker", "1.5")
    first = server.get()
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "block", timeout=8)
    server.wait_log("sent no heartbeat for 1.5 s")
    server.wait_log('svapp.py", line')  # faulthandler's dump shows where it was stuck
    wait_for(lambda: server.try_get() not in (first, None))


def test_preload_imports_the_app_once_in_a_template_not_the_master(served: Callable[..., Served]) -> None:
    server = served("--workers", "2", "--preload")
    pids = server.serving_pids(2)
    (template,) = server.import_log.read_text().split()
    assert int(template) not in pids | {server.proc.pid}
    wait_for(lambda: len(server.workers() - pids - {int(template)}) == 1)  # and the template's spare


def test_without_preload_each_worker_imports_the_app(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    pids = server.serving_pids(2)
    assert {int(p) for p in server.import_log.read_text().split()} == pids


def test_reload_restarts_workers_when_a_source_file_changes(served: Callable[..., Served], tmp_path: Path) -> None:
    server = served("--reload", "--reload-dir", str(tmp_path))
    first = server.get()

    def edit_and_check() -> bool:
        # Keep editing until the watcher noticed: it may start watching a moment after serving.
        (tmp_path / "svapp.py").write_text(APP + f"\n# edit {time.monotonic()}\n")
        return "Detected changes in" in server.log

    wait_for(edit_and_check, interval=0.2)
    wait_for(lambda: server.try_get() not in (first, None))


def test_usr1_reopens_logs_and_keeps_the_workers(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    pids = server.serving_pids(2)
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_log("Reopened log files (SIGUSR1 forwarded to 2 worker(s))")
    assert server.serving_pids(2) == pids == server.workers()


def test_int_stops_quickly_with_exit_code_0(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    server.serving_pids(2)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    assert "SIGINT: quick stop" in server.log


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(served: Callable[..., Served]) -> None:
    server = served("--workers", "2")
    pids = server.serving_pids(2)
    server.proc.kill()
    server.proc.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in pids))  # at their next heartbeat


# ---------------------------------------------------------------------------------------------
# Issue 6 "Proof" numbers (not tests): python -m tests.test_supervisor_cli [proof_name ...]


def tmpdir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="proof-"))


def proof_hup_slow_import() -> None:
    s = Served(tmpdir(), "--workers", "2", env={"APP_IMPORT_DELAY": "2"})
    old = s.serving_pids(2, timeout=20)
    load = KeepAliveLoad(s.url, clients=4)
    wait_for(lambda: load.ok > 500, 20)
    before = load.ok
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGHUP)
    s.wait_log("Reload complete", 30)
    t1 = time.monotonic()
    wait_for(lambda: s.workers().isdisjoint(old), 20)
    time.sleep(1)
    load.stop()
    print(f"HUP, 2 s import, 2 workers, 4 keep-alive clients: {load.ok} ok ({load.ok - before} after HUP), "
          f"{len(load.failures)} failed, longest request {load.longest * 1000:.1f} ms, reload took {t1 - t0:.2f} s")
    s.stop()


def proof_hup_broken() -> None:
    s = Served(tmpdir(), "--workers", "2")
    s.serving_pids(2)
    load = KeepAliveLoad(s.url, clients=4)
    wait_for(lambda: load.ok > 500, 20)
    s.broken_flag.write_text("")
    s.proc.send_signal(signal.SIGHUP)
    s.wait_log("Reload failed", 20)
    after = load.ok
    wait_for(lambda: load.ok > after + 2000, 20)
    load.stop()
    print(f"HUP with a broken app: reload failed and logged; {load.ok} ok ({load.ok - after} after the failure), "
          f"{len(load.failures)} failed; still serving: {s.try_get() is not None}")
    s.stop()


def proof_max_requests() -> None:
    s = Served(tmpdir(), "--workers", "2", "--max-requests", "50")
    first = s.serving_pids(2)
    load = KeepAliveLoad(s.url, clients=4)
    wait_for(lambda: load.ok >= 10000, 120)
    load.stop()
    print(f"--max-requests 50, 2 workers: {load.ok} requests, {len(load.failures)} failed, "
          f"{len(load.pids | first)} worker processes served")
    s.stop()


def proof_max_memory() -> None:
    s = Served(tmpdir(), "--workers", "2", "--max-memory", "100")
    s.serving_pids(2)
    from supervisor.memory import resident_memory, unique_memory

    peak_rss = 0
    peak_uss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_uss
        while not stop.is_set():
            for pid in s.workers():
                peak_rss = max(peak_rss, resident_memory(pid) or 0)
                peak_uss = max(peak_uss, unique_memory(pid) or 0)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    load = KeepAliveLoad(s.url, clients=2, path="leak")
    wait_for(lambda: load.ok >= 2000, 180)
    load.stop()
    stop.set()
    sampler.join()
    recycled = s.log.count("MiB, limit 100 MiB")
    print(f"--max-memory 100, 1 MiB leaked per request, 2 workers: {load.ok} requests, {len(load.failures)} failed, "
          f"{recycled} recycles, peak RSS per worker {peak_rss / 2**20:.0f} MiB (peak USS {peak_uss / 2**20:.0f} MiB)")
    s.stop()


def proof_kill_worker() -> None:
    # One worker, so that any answer after the kill comes from the replacement.
    s = Served(tmpdir(), "--workers", "1")
    times = []
    for _ in range(5):
        victim = s.get()
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: raw_get(s.port) not in (None, victim), 10, interval=0.001)
        times.append(time.monotonic() - t0)
    print("SIGKILL of the only worker -> replacement answering: "
          + ", ".join(f"{t * 1000:.0f}" for t in times) + " ms")
    s.stop()


def raw_get(port: int) -> int | None:
    """The answering pid, over a fresh connection; None when nobody answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError:
        return None
    return int(data.partition(b"\r\n\r\n")[2] or 0) or None


def proof_ready_gap() -> None:
    gaps = []
    for _ in range(5):
        tmp = tmpdir()
        fake = FakeSystemd(tmp)
        fake.sock.settimeout(0.001)
        s = Served(tmp, "--workers", "2", env={"NOTIFY_SOCKET": fake.path, "APP_IMPORT_DELAY": "0.5"})
        index = fake.wait("READY=1", timeout=20)
        ready_at = fake.messages[index][0]
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:  # first request after READY=1
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200")
        first_answer = [time.monotonic()]
        gaps.append((first_answer[0] - ready_at) * 1000)
        s.stop()
    print("READY=1 received -> first request answered (ms): "
          + ", ".join(f"{g:+.1f}" for g in gaps))


if __name__ == "__main__":
    for proof in sys.argv[1:] or [name for name in list(globals()) if name.startswith("proof_")]:
        globals()[proof]()


def test_run_from_python_with_workers_is_supervised(tmp_path: Path) -> None:
    """``uvworker.run(app, workers=2)`` forks two workers, like the CLI."""
    (tmp_path / "svapp.py").write_text(APP)
    sock = socket.create_server(("127.0.0.1", 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k not in CLEAN_ENV}
    env |= {"APP_IMPORT_LOG": str(tmp_path / "imports"), "PYTHONPATH": str(ROOT)}
    code = (f"import uvworker; uvworker.run('svapp:app', app_dir={str(tmp_path)!r}, fd={sock.fileno()}, "
            "workers=2, access_log=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, pass_fds=[sock.fileno()])
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()
    try:
        seen: set[int] = set()

        def two_workers() -> bool:
            try:
                seen.add(int(httpx.get(url, timeout=5).text))
            except httpx.HTTPError:
                pass
            return len(seen) >= 2

        wait_for(two_workers, timeout=15)
        assert proc.pid not in seen  # answered by forked workers, not the process that called run()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
