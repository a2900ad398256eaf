"""The generic supervisor on its own: real forks, real signals, a tiny HTTP worker defined here.

This file is also the master program the tests start (``python tests/test_supervisor.py JSON``):
it adopts the listening socket the test bound (or takes systemd's), and runs ``supervisor.run``
with ``blocking_http_worker`` as the worker target. It imports nothing from ``uvworker``, which
is why it polls with its own small ``wait_for`` instead of the conftest one.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import selectors
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

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.budget import EXHAUSTED, HOLD, NEARING, RESUME, Budget, lead_time  # noqa: E402
from supervisor.channel import HEARTBEAT, Message, decode, encode  # noqa: E402
from supervisor.child import HANDOVER_SIGNAL, SERVE_ON_SIGNAL, WorkerContext  # noqa: E402
from supervisor.config import SupervisorConfig, SupervisorError, default_workers  # noqa: E402
from supervisor.memory import unique_memory  # noqa: E402
from supervisor.pidfile import PidFile  # noqa: E402
from supervisor.sockets import systemd_listeners  # noqa: E402
from supervisor.systemd import Notifier, watchdog_interval  # noqa: E402
from supervisor.watch import PathFilter, PollingWatcher  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The worker target and the master program


def blocking_http_worker(ctx: WorkerContext) -> int:
    """A blocking HTTP/1.0-style server: one request per connection, heartbeats every 0.1 s.

    Behaviour on start comes from the "mode file" (so a test can "deploy" new code):
    ``ok``, ``crash`` (fails like an import error), ``slow:<s>`` (slow import), ``crash-after:<s>``
    (a slow import that fails), ``stubborn``
    (ignores SIGTERM and SIGHUP). Per request: ``/hang`` blocks without heartbeats, ``/leak`` keeps 1 MiB,
    ``/slow`` takes 0.3 s, ``/paced`` 2 ms, anything else answers "pid number generation uid".
    It keeps its budgets (requests, lifetime) as ``supervisor.budget`` describes (``nearing``;
    at the limit it stops accepting, and leaves if handed over, else holds until retired or told
    to serve on), unless the mode file says ``lax``; each hold leaves a ``held-<pid>`` file.
    """
    mode = PRELOADED.get("mode") or os.environ.get("SV_MODE") or Path(os.environ["SV_MODE_FILE"]).read_text().strip()
    if mode == "crash":
        print("ImportError: cannot import name 'app' from 'broken' (test)", file=sys.stderr)
        return 1
    if mode.startswith(("slow:", "crash-after:")):
        time.sleep(float(mode.split(":")[1]))
    if mode.startswith("crash-after:"):
        print("ImportError: cannot import name 'app' from 'broken' (test)", file=sys.stderr)
        return 1
    stop = {"graceful": False, "quick": False}

    def on_term(signum: int, frame: Any) -> None:
        if mode != "stubborn":
            stop["graceful"] = True

    def on_quick(signum: int, frame: Any) -> None:
        stop["quick"] = True

    def on_usr1(signum: int, frame: Any) -> None:
        Path(os.environ["SV_MODE_FILE"]).with_name(f"usr1-{os.getpid()}").write_text("reopened")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)  # retire: the master replaces this worker
    signal.signal(signal.SIGINT, on_quick)
    signal.signal(signal.SIGQUIT, on_quick)
    signal.signal(signal.SIGUSR1, on_usr1)
    budget = None
    started = time.monotonic()
    if (ctx.requests_limit or ctx.lifetime_limit) and mode != "lax":
        budget = Budget(ctx.requests_limit, lead_time(started - ctx.spawned_at, ctx.boot_estimate), started,
                        ctx.rate_estimate)
    told: list[int] = []  # HANDOVER_SIGNAL, SERVE_ON_SIGNAL, in the order they came
    signal.signal(HANDOVER_SIGNAL, lambda signum, frame: told.append(signum))
    signal.signal(SERVE_ON_SIGNAL, lambda signum, frame: told.append(signum))

    def decide(decision: str | None) -> None:
        if budget is None:
            return
        if decision == NEARING:
            ctx.channel.nearing(served, budget.eta)
        elif decision == HOLD:
            for sock in ctx.sockets:
                selector.unregister(sock)  # not one more accept: the budget is exact
            Path(os.environ["SV_MODE_FILE"]).with_name(f"held-{os.getpid()}").write_text(str(served))
            ctx.channel.holding(served, budget.spent or "")
        elif decision == RESUME:
            for sock in ctx.sockets:
                selector.register(sock, selectors.EVENT_READ)
        elif decision == EXHAUSTED:
            ctx.channel.retiring(budget.spent)
            stop["graceful"] = True

    def heed() -> None:
        """The master's signals, and the lifetime: before the next accept, so the budget is exact."""
        while told and budget is not None:
            signum = told.pop(0)
            decide(budget.hand_over(served) if signum == HANDOVER_SIGNAL else budget.serve_on())
        if budget is not None and ctx.lifetime_limit and time.monotonic() >= started + ctx.lifetime_limit:
            decide(budget.expire())

    selector = selectors.DefaultSelector()
    for sock in ctx.sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    served = 0
    leaked: list[bytes] = []
    ctx.channel.ready()
    next_beat = 0.0
    while not (stop["graceful"] or stop["quick"]):
        heed()
        if stop["graceful"]:
            break
        now = time.monotonic()
        if now >= next_beat:
            if not ctx.channel.heartbeat(served):
                return 0  # the master is gone
            next_beat = now + 0.1
            if budget is not None and served < budget.limit:
                decide(budget.update(served, now))  # the rate, as the real worker measures it
        for key, _ in selector.select(0.05):
            heed()
            if stop["graceful"] or key.fileobj not in selector.get_map():
                break
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            with conn:
                conn.setblocking(True)
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b"/"
                if path == b"/hang":
                    while True:
                        time.sleep(0.05)
                if path == b"/leak":
                    leaked.append(os.urandom(1 << 20))
                if path == b"/slow":
                    time.sleep(0.3)
                if path == b"/paced":
                    time.sleep(0.002)
                served += 1
                body = f"{os.getpid()} {ctx.number} {ctx.generation} {os.getuid()}".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            if budget is not None and served >= budget.check_at:
                decide(budget.update(served, time.monotonic()))
                break  # a hold or a stop takes effect before the next accept
    ctx.channel.heartbeat(served)
    if stop["graceful"]:
        ctx.channel.retiring()
    return 0


PRELOADED: dict[str, str] = {}  # with "preload": the mode the template read (the "code" it loaded)


def fake_preload() -> int:
    """The template's "import": read the mode file once (``crash`` fails like a broken import,
    ``slow:<s>`` takes that long) and log "pid uid" to the ``preloads`` file beside it."""
    mode_file = Path(os.environ["SV_MODE_FILE"])
    if os.environ.get("SV_MODE"):  # e.g. --user: the test's directory is not ours to read
        PRELOADED["mode"] = os.environ["SV_MODE"]
        return 0
    mode = mode_file.read_text().strip()
    if mode == "crash":
        print("ImportError: cannot import name 'app' from 'broken' (test)", file=sys.stderr)
        return 1
    if mode.startswith("slow:"):
        time.sleep(float(mode.split(":")[1]))
    with open(mode_file.with_name("preloads"), "a") as log:
        log.write(f"{os.getpid()} {os.getuid()}\n")
    PRELOADED["mode"] = "ok" if mode.startswith("slow:") else mode
    return 0


def master_main(spec: dict[str, Any]) -> int:
    from supervisor import run
    from supervisor.sockets import adopt_fd

    logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(message)s")
    if spec.get("log_file"):
        handler = logging.FileHandler(spec["log_file"])
        handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
        logging.getLogger().addHandler(handler)
    if spec.get("systemd"):
        sockets = [listener.sock for listener in systemd_listeners()]
    else:
        sockets = [adopt_fd(spec["fd"])]
    config = SupervisorConfig(proc_name="svtest", label="test:app", **spec.get("config", {}))
    if spec.get("preload"):
        config.preload = fake_preload
    return run(blocking_http_worker, sockets, config)


if __name__ == "__main__":
    sys.exit(master_main(json.loads(sys.argv[1])))


# ---------------------------------------------------------------------------------------------
# Test helpers


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"bad response {data!r}")
    return body.decode()


def try_get(port: int, path: str = "/") -> str | None:
    try:
        return http_get(port, path, timeout=2.0)
    except OSError:
        return None


def pid_of(body: str) -> int:
    return int(body.split()[0])


class Supervised:
    """One master subprocess running this file, with its log, its port and its mode file."""

    def __init__(self, tmp: Path, *, systemd: bool = False, env: dict[str, str] | None = None,
                 mode: str = "ok", preload: bool = False, **config: Any) -> None:
        self.tmp = tmp
        self.mode_file = tmp / "mode"
        self.mode_file.write_text(mode)
        self.stderr_path = tmp / "master.log"
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        fd = self.listener.fileno()
        spec = {"fd": fd, "systemd": systemd, "config": config, "log_file": str(tmp / "file.log"), "preload": preload}
        full_env = {**os.environ, "SV_MODE_FILE": str(self.mode_file), "PYTHONPATH": str(ROOT)}
        full_env.update(env or {})
        argv = [sys.executable, __file__, json.dumps(spec)]
        preexec = None
        pass_fds = [fd]
        if systemd:
            # systemd passes sockets from fd 3 on, and LISTEN_PID must be the pid of the program
            # that reads it: dup the socket to 3 in the child and let a shell export its own $$.
            def preexec() -> None:
                os.dup2(fd, 3)

            pass_fds = [3]
            argv = ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *argv]
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, pass_fds=pass_fds, stderr=self.stderr, env=full_env, cwd=tmp,
                                     preexec_fn=preexec)
        self.listener.close()  # the master owns it now

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 5.0) -> None:
        try:
            wait_for(lambda: text in self.log, timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not in log:\n{self.log}") from None

    def get(self, path: str = "/") -> str:
        return http_get(self.port, path)

    def pids(self, count: int, timeout: float = 20.0) -> set[int]:
        """Worker pids seen in answers, once ``count`` distinct ones answered (a deadline for
        workers to start: at a load average of 7 a --preload template and its forks took over
        5 s)."""
        seen: set[int] = set()

        def enough() -> bool:
            body = try_get(self.port)
            if body:
                seen.add(pid_of(body))
            return len(seen) >= count

        wait_for(enough, timeout)
        return seen

    def preloads(self) -> list[int]:
        """The pids of the templates that loaded the "app" so far (``preload``)."""
        path = self.tmp / "preloads"
        return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for pid in self.worker_pids_snapshot:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stderr.close()

    worker_pids_snapshot: set[int] = set()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(**kwargs: Any) -> Supervised:
        sv = Supervised(tmp_path, **kwargs)
        started.append(sv)
        return sv

    yield start
    for sv in started:
        if sv.proc.poll() is None:
            sv.worker_pids_snapshot = sv.worker_pids()
        sv.close()


class Load:
    """Clients in threads sending requests back to back; counts answers and failures."""

    def __init__(self, port: int, clients: int = 4, path: str = "/") -> None:
        self.port, self.path = port, path
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.served: Counter[int] = Counter()  # answers per worker pid
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                body = http_get(self.port, self.path)
            except OSError as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                continue
            with self._lock:
                self.ok += 1
                self.pids.add(pid_of(body))
                self.served[pid_of(body)] += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


class FakeSystemd:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait(self, field: str, timeout: float = 5.0, after: int = 0) -> int:
        """Index of the first message (from ``after``) containing the line ``field``."""
        def found() -> int | None:
            self.receive()
            for index, (_, text) in enumerate(self.messages[after:], after):
                if field in text.split("\n") or any(line.startswith(field) for line in text.split("\n")):
                    return index + 1
            return None

        return wait_for(found, timeout) - 1


# ---------------------------------------------------------------------------------------------
# Units


def test_channel_roundtrip_and_garbage() -> None:
    data = encode("ready") + encode(HEARTBEAT, 42) + b"nonsense 1 2\n" + encode("retiring") + b"heart"
    messages, rest = decode(data)
    assert messages == [Message("ready"), Message(HEARTBEAT, 42), Message("retiring")]
    assert rest == b"heart"


def test_default_workers_from_web_concurrency() -> None:
    assert default_workers({}) == 1
    assert default_workers({"WEB_CONCURRENCY": "4"}) == 4
    with pytest.raises(SupervisorError, match="positive integer"):
        default_workers({"WEB_CONCURRENCY": "many"})


def test_pidfile_refuses_live_pid_and_replaces_stale(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(SupervisorError, match="still running"):
        PidFile(str(path)).create(os.getpid())
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(f"{dead.pid}\n")
    pidfile = PidFile(str(path))
    pidfile.create(os.getpid())
    assert path.read_text() == f"{os.getpid()}\n"
    pidfile.remove()
    assert not path.exists()


def test_unique_memory_grows_with_private_allocations() -> None:
    # Fresh anonymous pages, touched one by one: a malloc'd block could come from heap the process
    # already holds (earlier tests' freed memory, glibc's raised mmap threshold) and add nothing.
    before = unique_memory(os.getpid())
    assert before is not None and before > 0
    block = mmap.mmap(-1, 32 << 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    after = unique_memory(os.getpid())
    assert after is not None and after - before >= 24 << 20
    block.close()


def test_systemd_environment_parsing() -> None:
    assert systemd_listeners({"LISTEN_FDS": "1", "LISTEN_PID": "1"}) == []  # not for us
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.5 and env == {}
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    env = {"NOTIFY_SOCKET": "@abstract"}
    notifier = Notifier.from_environ(env)
    assert notifier.address == b"\0abstract" and "NOTIFY_SOCKET" not in env
    notifier.close()


def test_polling_watcher_sees_changes_and_honours_filters(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "hook.py").write_text("")
    watcher = PollingWatcher([str(tmp_path)], PathFilter(["*.py"], [".*", "skip_*.py"]))
    assert watcher.poll() == []
    (tmp_path / "skip_me.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / ".git" / "hook.py").write_text("changed")
    assert watcher.poll() == []
    os.utime(tmp_path / "app.py", ns=(1, 1))
    assert watcher.poll() == [str(tmp_path / "app.py")]


# ---------------------------------------------------------------------------------------------
# The master, end to end


def test_workers_titles_pidfile_and_graceful_stop(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    pidfile = tmp_path / "master.pid"
    sv = supervised(workers=2, pidfile=str(pidfile))
    pids = sv.pids(2)
    assert pidfile.read_text().strip() == str(sv.proc.pid)
    master_cmd = Path(f"/proc/{sv.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    assert master_cmd.startswith(b"svtest: master [test:app]")
    titles = {Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip() for pid in pids}
    assert {t.split(b" [")[0] for t in titles} == {b"svtest: worker 1", b"svtest: worker 2"}
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert not pidfile.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert try_get(sv.port) is None


def test_web_concurrency_sets_worker_count(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(env={"WEB_CONCURRENCY": "3"})
    sv.pids(3)
    wait_for(lambda: len(sv.worker_pids()) == 3)


def test_live_pidfile_refused_with_one_line(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    pidfile = tmp_path / "master.pid"
    pidfile.write_text(str(os.getpid()))
    sv = supervised(pidfile=str(pidfile))
    assert sv.wait_exit() == 1
    assert "is another server already started?" in sv.log
    assert "Traceback" not in sv.log
    assert pidfile.read_text() == str(os.getpid())


def test_killed_worker_is_replaced(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2)
    first = sv.pids(2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(sv.worker_pids() - first) == 1)
    sv.wait_log("was killed by SIGKILL unexpectedly")
    assert victim not in sv.pids(2)


def test_startup_crash_loop_exits_3_with_one_error(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, mode="crash")
    assert sv.wait_exit(10) == 3
    errors = [line for line in sv.log.splitlines() if "keep failing before they are ready" in line]
    assert len(errors) == 1, sv.log
    assert "Traceback" not in sv.log


def test_hung_worker_is_aborted_with_a_stack_dump_and_replaced(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, timeout_worker=0.5, abort_grace=1.0)
    pid = pid_of(sv.get())
    with pytest.raises(OSError):
        http_get(sv.port, "/hang", timeout=1.0)
    sv.wait_log("sent no heartbeat for 0.5 s")
    sv.wait_log("blocking_http_worker")  # faulthandler's dump names the function it hung in
    new = wait_for(lambda: (b := try_get(sv.port)) and pid_of(b) != pid and pid_of(b))
    assert new != pid
    sv.wait_log("killed by SIGABRT after it was found hung")


def test_hup_rolls_workers_without_failed_requests(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, mode="slow:0.3")
    old = sv.pids(2)
    load = Load(sv.port)
    sv.signal(signal.SIGHUP)
    sv.wait_log("Reload complete")
    wait_for(lambda: len(sv.pids(2) - old) == 2)
    load.stop()
    assert load.failures == []
    assert load.ok > 0
    assert old.isdisjoint(sv.worker_pids())
    assert all(sv.get().split()[2] == "2" for _ in range(4))  # generation 2 answers


def test_hup_with_broken_code_keeps_old_workers(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2)
    old = sv.pids(2)
    sv.mode_file.write_text("crash")
    load = Load(sv.port, clients=2)
    sv.signal(signal.SIGHUP)
    sv.wait_log("Reload failed")
    assert sv.worker_pids() == old
    sv.mode_file.write_text("ok")
    sv.signal(signal.SIGHUP)
    sv.wait_log("Reload complete")
    load.stop()
    assert load.failures == [] and load.pids >= old
    wait_for(lambda: sv.worker_pids().isdisjoint(old))  # retired at "Reload complete": exiting


def test_notify_sequence_and_socket_activation(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    fake = FakeSystemd(tmp_path)
    started = time.monotonic()
    sv = supervised(systemd=True, workers=2, mode="slow:0.3",
                    env={"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "200000", "LISTEN_FDS": "1",
                         "LISTEN_FDNAMES": "web"})
    ready = fake.wait("READY=1")
    ready_at = fake.messages[ready][0]
    assert ready_at - started >= 0.3  # not before the workers' slow start was over
    assert f"MAINPID={sv.proc.pid}" in fake.messages[ready][1]
    body = sv.get()  # READY=1 means answering right now
    assert time.monotonic() - ready_at < 1.0 and body
    fake.wait("WATCHDOG=1", after=ready)
    sv.signal(signal.SIGHUP)
    reloading = fake.wait("RELOADING=1", after=ready)
    assert "MONOTONIC_USEC=" in fake.messages[reloading][1]
    fake.wait("READY=1", after=reloading + 1)
    sv.signal(signal.SIGTERM)
    fake.wait("STOPPING=1", after=reloading)
    assert sv.wait_exit() == 0


def test_max_requests_is_exact_once_the_replacement_is_ready(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, max_requests=300)
    # Paced requests, so that a budget lasts long enough to measure the rate and ask ahead.
    load = Load(sv.port, clients=3, path="/paced")
    wait_for(lambda: sv.log.count("after retiring (") >= 4, timeout=30)
    load.stop()
    assert load.failures == []
    # One request per connection: a worker stops accepting at its limit, its replacement ready
    # or not, and so serves exactly that many at most.
    finished = {pid: n for pid, n in load.served.items() if not alive(pid)}
    assert finished and max(finished.values()) <= 300, (finished, sv.log)


def test_a_late_replacement_finds_the_old_worker_holding_at_its_limit(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=1, max_requests=20)
    first = pid_of(sv.get())
    sv.mode_file.write_text("slow:1")  # every replacement now takes a second to boot
    load = Load(sv.port, clients=3)
    sv.wait_log("before its replacement was ready", timeout=10)
    wait_for(lambda: len(load.pids - {first}) >= 1, timeout=10)  # then the replacement serves
    load.stop()
    assert load.failures == []  # meanwhile the clients waited in the listen backlog
    assert load.served[first] <= 20 and int(sv.tmp.joinpath(f"held-{first}").read_text()) == 20


def test_a_replacement_that_cannot_start_lets_the_holding_worker_serve_on(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=1, max_requests=20)
    first = pid_of(sv.get())
    sv.mode_file.write_text("crash-after:1")  # a broken deploy on disk: every replacement fails to start
    load = Load(sv.port, clients=3)
    sv.wait_log("accepts again, past its budget", timeout=10)  # it held at its limit until the failure
    wait_for(lambda: load.served[first] > 60, timeout=10)  # the fleet never went to zero
    load.stop()
    assert load.failures == [] and load.pids == {first}
    sv.mode_file.write_text("ok")  # fixed: the next retry replaces it
    wait_for(lambda: (b := try_get(sv.port)) and pid_of(b) != first, timeout=15)


def test_a_worker_that_keeps_no_budget_is_recycled_from_its_heartbeats(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=2, max_requests=20, max_requests_jitter=5, mode="lax")
    first = sv.pids(2)
    load = Load(sv.port, clients=3)
    wait_for(lambda: len(load.pids - first) >= 2, timeout=8)
    load.stop()
    assert load.failures == []
    assert "Recycling worker" in sv.log and "requests, limit" in sv.log


def test_max_lifetime_recycles(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, max_lifetime=0.5, max_lifetime_jitter=0.2)
    first = pid_of(sv.get())
    load = Load(sv.port, clients=2)
    wait_for(lambda: len(load.pids - {first}) >= 1, timeout=5)
    load.stop()
    assert load.failures == []
    assert "its lifetime of 1 s ends in" in sv.log or "its lifetime of 0 s ends in" in sv.log
    sv.wait_log("handing over from worker 1")  # the replacement was ready before the lifetime ended


def test_max_lifetime_holds_at_its_end_while_the_replacement_is_late(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, max_lifetime=1.0)
    first = pid_of(sv.get())
    sv.mode_file.write_text("slow:1.5")  # the replacement is asked early, but boots for longer
    load = Load(sv.port, clients=2)
    sv.wait_log("is at its budget", timeout=10)  # the lifetime is over: it accepts nothing more
    wait_for(lambda: len(load.pids - {first}) >= 1, timeout=10)
    load.stop()
    assert load.failures == [] and sv.tmp.joinpath(f"held-{first}").exists()


def test_max_memory_recycles_a_leaking_worker(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, max_memory=40, memory_interval=0.1, memory_samples=2)
    first = pid_of(sv.get())
    for _ in range(50):
        http_get(sv.port, "/leak")
    sv.wait_log("MiB, limit 40 MiB")
    wait_for(lambda: pid_of(sv.get()) != first)


def test_ttin_ttou_resize(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1)
    sv.pids(1)
    sv.signal(signal.SIGTTIN)
    wait_for(lambda: len(sv.worker_pids()) == 2)
    sv.pids(2)
    sv.signal(signal.SIGTTOU)
    wait_for(lambda: len(sv.worker_pids()) == 1)
    sv.signal(signal.SIGTTOU)
    sv.wait_log("at least one worker must remain")


def test_usr1_reopens_master_logs_and_reaches_workers(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    sv = supervised(workers=2)
    pids = sv.pids(2)
    log_file = tmp_path / "file.log"
    wait_for(log_file.exists)
    log_file.rename(tmp_path / "file.log.1")
    sv.signal(signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "Reopened log files" in log_file.read_text())
    for pid in pids:
        wait_for((tmp_path / f"usr1-{pid}").exists)


def test_int_is_quick_and_term_is_bounded(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, mode="stubborn", graceful_timeout=0.3, stop_margin=0.3)
    sv.pids(2)
    started = time.monotonic()
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert time.monotonic() - started < 3
    sv.wait_log("did not stop in time; killing them")


def test_second_int_kills_at_once(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, mode="stubborn", graceful_timeout=30)
    pid = pid_of(sv.get())
    os.kill(pid, signal.SIGSTOP)  # a worker that cannot even run its INT handler
    sv.signal(signal.SIGINT)
    sv.wait_log("SIGINT: quick stop")
    sv.signal(signal.SIGINT)
    assert sv.wait_exit(3) == 0
    sv.wait_log("Second SIGINT")


@pytest.mark.parametrize("watcher", ["auto", "polling"])
def test_reload_on_file_change(supervised: Callable[..., Supervised], tmp_path: Path, watcher: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.py").write_text("x = 1")
    sv = supervised(workers=1, reload=True, reload_dirs=[str(src)], reload_interval=0.1, reload_watcher=watcher)
    first = pid_of(sv.get())

    def edit_and_check() -> bool:
        # Keep editing until the watcher has noticed: it may start watching a moment later.
        (src / "app.py").write_text(f"x = {time.monotonic()}")
        return "Detected changes in" in sv.log

    wait_for(edit_and_check, interval=0.1)
    wait_for(lambda: pid_of(sv.get()) != first)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_and_group_apply_to_workers(supervised: Callable[..., Supervised], tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    sv = supervised(workers=1, user="nobody", umask=0o027, env={"SV_MODE": "ok"})  # tmp is 0700
    assert int(sv.get().split()[3]) == nobody.pw_uid


def test_recycling_keeps_the_old_worker_until_a_replacement_is_ready(
    supervised: Callable[..., Supervised],
) -> None:
    # A lifetime longer than the lead (3 boots + 0.2 s): no replacement before the "deploy" breaks.
    sv = supervised(workers=1, max_lifetime=1.0)
    first = pid_of(sv.get())
    sv.mode_file.write_text("crash")  # every replacement now fails to start
    sv.wait_log("keeps serving and will be replaced later")
    assert pid_of(sv.get()) == first
    sv.mode_file.write_text("ok")
    wait_for(lambda: (b := try_get(sv.port)) and pid_of(b) != first)


def test_workers_leave_when_the_master_dies(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2)
    pids = sv.pids(2)
    sv.proc.kill()
    sv.proc.wait(5)
    wait_for(lambda: not any(alive(pid) for pid in pids))  # their next heartbeat finds no master


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
