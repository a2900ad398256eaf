"""--access-logfile / --error-logfile and SIGUSR1 (issue 13, item 4), black-box: a real server
process (single, or a supervisor with 2 workers) under keep-alive load on loopback while
logrotate's steps are played: move the files away, send SIGUSR1 to the server. Every request's
access line, and every failing request's error-log traceback, must be in exactly one of the
files: none lost, none twice."""

from __future__ import annotations

import collections
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_cli import ROOT, environment, one_error_line, uvworker

LOG_APP = '''
import os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"].startswith("/fail/"):
        raise RuntimeError("failing on purpose: " + scope["path"])
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
'''

ACCESS_LINE = re.compile(r"^<(\d+)> /(ok|fail)/(\d+) (\d{3})$")
ERROR_LINE = re.compile(r"RuntimeError: failing on purpose: /fail/(\d+)$", re.M)


class Load:
    """Keep-alive clients in threads; request ``i`` goes to /fail/i for every 10th i, else /ok/i."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.next_id = 0
        self.answered: dict[int, int] = {}  # id -> status
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def take_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def run(self) -> None:
        while not self.stop.is_set():
            with httpx.Client(timeout=10) as client:  # a new connection now and then: every worker gets some
                for _ in range(10):
                    if self.stop.is_set():
                        break
                    self.one(client)

    def one(self, client: httpx.Client) -> None:
        i = self.take_id()
        path = f"/fail/{i}" if i % 10 == 0 else f"/ok/{i}"
        try:
            status = client.get(self.url + path).status_code
        except httpx.HTTPError as exc:
            with self.lock:
                self.failures.append(f"{path}: {exc!r}")
            return
        with self.lock:
            self.answered[i] = status

    def count(self) -> int:
        with self.lock:
            return len(self.answered)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def pids_in(text: str) -> set[int]:
    return {int(m.group(1)) for m in map(ACCESS_LINE.match, text.splitlines()) if m}


@pytest.mark.parametrize("mode", [["--workers", "2"], []], ids=["workers-2", "single"])
def test_rotated_log_files_lose_and_repeat_no_line(tmp_path: Path, mode: list[str]) -> None:
    (tmp_path / "logapp.py").write_text(LOG_APP)
    logs = tmp_path / "logs"
    logs.mkdir()
    access, error = logs / "access.log", logs / "error.log"
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "logapp:app", "--app-dir", str(tmp_path), "--fd", str(sock.fileno()),
         "--access-logfile", str(access), "--error-logfile", str(error), "--access-log-format", "%(p)s %(U)s %(s)s",
         *mode],
        cwd=ROOT, env=environment(), pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sock.close()
    processes = 2 if mode else 1
    load = None
    try:
        warm_up = httpx.get(url + "/ok/0", timeout=20).status_code  # the server accepts once it is ready
        load = Load(url)
        generations = [(access, error)]
        for rotation in (1, 2):  # logrotate: move the files away, then SIGUSR1 to the server
            start = load.count()
            wait_for(lambda: load.count() >= start + 300, timeout=30)
            old = (logs / f"access.log.{rotation}", logs / f"error.log.{rotation}")
            access.rename(old[0])
            error.rename(old[1])
            generations.insert(-1, old)
            proc.send_signal(signal.SIGUSR1)
            # Every process reopened once its lines reach the new file.
            wait_for(lambda: len(pids_in(read(access))) == processes, timeout=20)
        first_after_reopen = load.next_id + 1
        start = load.count()
        wait_for(lambda: load.count() >= start + 300, timeout=30)
        load.finish()
        load_failures = list(load.failures)
    finally:
        if load is not None:
            load.finish()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert load_failures == []
    assert out == "" and err == ""  # everything went to the files

    answered = {0: warm_up, **load.answered}
    found: collections.Counter[int] = collections.Counter()
    in_newest: set[int] = set()
    for number, (access_file, _) in enumerate(generations):
        lines = read(access_file).splitlines()
        assert lines, f"{access_file.name} is empty"
        for line in lines:
            match = ACCESS_LINE.match(line)
            assert match, line
            i, status = int(match.group(3)), int(match.group(4))
            assert answered.get(i) == status, line
            found[i] += 1
            if number == len(generations) - 1:
                in_newest.add(i)
        assert len(pids_in(read(access_file))) == processes, f"{access_file.name}: not every process wrote to it"
    assert [i for i, n in found.items() if n > 1] == [], "access lines written twice"
    assert sorted(answered.keys() - found.keys()) == [], "access lines lost"
    assert {i for i in answered if i >= first_after_reopen} <= in_newest  # after the reopen: the new file

    errors = collections.Counter(int(i) for old_access, old_error in generations for i in ERROR_LINE.findall(read(old_error)))
    failed = {i for i, status in answered.items() if status == 500}
    assert len(failed) >= 80 and failed == {i for i in answered if i and i % 10 == 0}
    assert [i for i, n in errors.items() if n > 1] == [], "error-log lines written twice"
    assert sorted(failed - errors.keys()) == [], "error-log lines lost"
    for _, error_file in generations:  # the server's own messages follow the files too
        assert "Exception in ASGI application" in read(error_file)
    if mode:
        assert read(error).count("Reopened log files (SIGUSR1 forwarded to 2 worker(s))") == 1
    print(f"\n{len(answered)} requests, {sum(found.values())} access lines and {sum(errors.values())} "
          f"of {len(failed)} error tracebacks in {len(generations)} generations of files")


def test_dash_is_the_standard_streams_and_bad_paths_are_one_line(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "examples.hello:app", "--fd", str(sock.fileno()),
         "--access-logfile", "-", "--error-logfile", "-"],
        cwd=ROOT, env=environment(), pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sock.close()
    try:
        assert httpx.get(url, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert '"GET / HTTP/1.1" 200' in out and "[INFO]" in err
    missing_dir = tmp_path / "no" / "such" / "dir" / "access.log"
    assert one_error_line(uvworker("examples.hello:app", "--access-logfile", str(missing_dir)), 1) == (
        f"Cannot open the --access-logfile {str(missing_dir)!r}: No such file or directory."
    )


@pytest.mark.parametrize("mode", [["--workers", "1"], []], ids=["workers-1", "single"])
def test_sigusr1_while_the_app_is_imported_does_not_kill(tmp_path: Path, mode: list[str]) -> None:
    """logrotate may signal while a process is still importing the app (no event loop yet):
    SIGUSR1's default action would end it."""
    (tmp_path / "slowapp.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(tmp_path / 'importing')!r}).touch()\ntime.sleep(1)\n" + LOG_APP
    )
    error = tmp_path / "error.log"
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvworker", "slowapp:app", "--app-dir", str(tmp_path), "--fd", str(sock.fileno()),
         "--error-logfile", str(error), "--access-logfile", str(tmp_path / "access.log"), *mode],
        cwd=ROOT, env=environment(), pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sock.close()
    try:
        wait_for(lambda: (tmp_path / "importing").exists(), timeout=20)
        error.rename(tmp_path / "error.log.1")
        proc.send_signal(signal.SIGUSR1)
        assert httpx.get(url + "/ok/1", timeout=20).status_code == 200
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Listening on" in read(error)  # the process that was importing reopened the file
    assert "crashed" not in read(error) + read(tmp_path / "error.log.1")
