"""--preload as a fork server (supervisor.forkserver): the app loaded once in a template, every
worker forked from it and a child of the master; reloads through a new template; the
template's death; memory shared with the template not counted by --max-memory.

The first tests drive the generic supervisor (tests/test_supervisor.py's master program and
blocking worker, whose "import" is ``fake_preload``); the last ones the real CLI.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from supervisor.memory import resident_memory, unique_memory
from tests.conftest import wait_for
from tests.test_supervisor import Load, Supervised, alive, pid_of, supervised, try_get  # noqa: F401 (fixture)
from tests.test_supervisor_cli import KeepAliveLoad, Served, served  # noqa: F401 (fixture)

MiB = 1024 * 1024


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def template_pid(log: str, nth: int = -1) -> int:
    return [int(pid) for pid in re.findall(r"The template \(pid (\d+)\) loaded the application", log)][nth]


def generation_of(body: str) -> int:
    return int(body.split()[2])


# ---------------------------------------------------------------------------------------------
# The generic supervisor


def test_every_worker_is_forked_from_one_template_and_is_the_masters_child(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=2, preload=True)
    workers = sv.pids(2)
    (template,) = sv.preloads()
    assert template not in workers | {sv.proc.pid}
    assert parent_of(template) == sv.proc.pid and all(parent_of(pid) == sv.proc.pid for pid in workers)
    victim = workers.pop()
    os.kill(victim, signal.SIGKILL)  # a crash: respawned from the template
    sv.signal(signal.SIGTTIN)  # and one more worker
    sv.wait_log("SIGTTIN: adding worker 3")  # its ready line may come before the template says its pid
    now = sv.pids(3, timeout=10)
    assert victim not in now and all(parent_of(pid) == sv.proc.pid for pid in now)
    sv.signal(signal.SIGTTOU)
    sv.wait_log("SIGTTOU: removing worker 3")
    assert sv.preloads() == [template]  # the "app" was loaded once
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert not alive(template)


def spares(sv: Supervised, generation: int) -> set[int]:
    """The master's children titled as template ``generation``'s spare (a worker forked ahead)."""
    return {pid for pid in sv.worker_pids() if f"spare {generation} [" in title_of(pid)}


def title_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_spare_forked_ahead_becomes_the_next_worker(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=1, preload=True)
    (worker,) = sv.pids(1)
    (spare,) = wait_for(lambda: spares(sv, 1))  # asleep, and the master's child already
    assert sv.worker_pids() == {worker, spare, *sv.preloads()}
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: (body := try_get(sv.port)) and pid_of(body) == spare)  # it took the worker's place
    assert "worker 1 [" in title_of(spare)
    (new,) = wait_for(lambda: spares(sv, 1))  # and the template forked the next one
    assert new != spare and parent_of(new) == sv.proc.pid


def test_hup_loads_the_new_code_in_a_new_template_then_rolls_the_workers(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=2, preload=True)
    old = sv.pids(2)
    load = Load(sv.port, clients=3)
    wait_for(lambda: load.ok > 20)
    sv.signal(signal.SIGHUP)
    sv.wait_log("Reload complete")
    first, second = sv.preloads()
    wait_for(lambda: not alive(first))  # the old template was stopped
    answered = load.ok
    wait_for(lambda: load.ok > answered + 20)
    load.stop()
    assert load.failures == []
    new = sv.pids(2)
    assert new.isdisjoint(old) and all(parent_of(pid) == sv.proc.pid for pid in new)
    assert generation_of(sv.get()) == 2 and alive(second)
    wait_for(lambda: not spares(sv, 1) and len(spares(sv, 2)) == 1)  # a spare leaves with its template


def test_a_broken_deploy_keeps_the_old_template_forking(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, preload=True)
    old = sv.pids(2)
    (template,) = sv.preloads()
    sv.mode_file.write_text("crash")
    sv.signal(signal.SIGHUP)
    sv.wait_log("Reload failed: the new template")
    assert "cannot import name 'app' from 'broken'" in sv.log
    assert sv.pids(2) == old
    victim = old.pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(sv.pids(2) - old - {victim}) == 1)  # a replacement from the old code
    assert generation_of(sv.get()) == 1 and sv.preloads() == [template] and alive(template)


def test_a_template_that_dies_is_restarted_and_the_workers_serve_on(
    supervised: Callable[..., Supervised],
) -> None:
    sv = supervised(workers=2, preload=True)
    workers = sv.pids(2)
    (first,) = sv.preloads()
    os.kill(first, signal.SIGKILL)
    sv.wait_log("was killed by SIGKILL; starting a new one (the workers serve on)")
    wait_for(lambda: len(sv.preloads()) == 2)
    second = sv.preloads()[1]
    assert sv.pids(2) == workers
    victim = workers.pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(sv.pids(2) - workers - {victim}) == 1)
    assert alive(second) and parent_of(second) == sv.proc.pid


def test_a_template_failing_at_startup_is_a_crash_loop(supervised: Callable[..., Supervised]) -> None:
    sv = supervised(workers=2, preload=True, mode="crash")
    assert sv.wait_exit(15) == 3
    assert sv.log.count("The template keeps failing before it loads the application") == 1


def test_user_applies_to_the_template_and_its_workers(supervised: Callable[..., Supervised]) -> None:
    nobody = pwd.getpwnam("nobody")
    sv = supervised(workers=1, preload=True, user="nobody", env={"SV_MODE": "ok"})
    assert int(sv.get().split()[3]) == nobody.pw_uid
    status = Path(f"/proc/{template_pid(sv.log)}/status").read_text()
    assert re.search(rf"^Uid:\s+{nobody.pw_uid}\s", status, re.M)  # the app is loaded as the user


# ---------------------------------------------------------------------------------------------
# Through the CLI

APP = r'''
import gc, os, time
VERSION = open(os.environ["APP_VERSION_FILE"]).read().strip()
if VERSION == "broken":
    raise RuntimeError("deliberately broken deploy")
with open(os.environ["APP_IMPORT_LOG"], "a") as log:
    log.write(f"{os.getpid()}\n")
HELD = [[n] for n in range(int(os.environ.get("APP_OBJECTS", "0")))]  # tracked by the gc; shared

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                with open(os.environ["APP_IMPORT_LOG"] + ".lifespan", "a") as log:
                    log.write(f"{os.getpid()}\n")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/gc":
        gc.collect()  # a worker's collection must not copy the template's pages
    body = f"{os.getpid()} {VERSION}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


def start(served: Callable[..., Served], tmp: Path, *args: str, **env: str) -> Served:
    version = tmp / "version"
    version.write_text("1")
    return served("--preload", *args, app=APP, env={"APP_VERSION_FILE": str(version), **env})


def test_hup_with_preload_serves_the_new_code_with_zero_failed_requests(
    served: Callable[..., Served], tmp_path: Path,
) -> None:
    server = start(served, tmp_path, "--workers", "2")
    old = server.serving_pids(2)
    lines = lambda name: server.import_log.with_name(name).read_text().split()  # noqa: E731
    assert lines("imports") == [str(template_pid(server.log))]  # once, in the template
    assert set(map(int, lines("imports.lifespan"))) == old  # lifespan: in each worker
    load = KeepAliveLoad(server.url, clients=4)
    wait_for(lambda: load.ok > 50)
    (tmp_path / "version").write_text("2")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("Reload complete")
    wait_for(lambda: server.workers().isdisjoint(old))
    answered = load.bodies["2"]
    wait_for(lambda: load.bodies["2"] > answered + 50)
    load.stop()
    assert load.failures == []
    assert httpx.get(server.url, timeout=5).text.endswith(" 2")
    assert len(lines("imports")) == 2 and len(lines("imports.lifespan")) == 4


def test_a_broken_deploy_with_preload_keeps_serving_the_old_code(
    served: Callable[..., Served], tmp_path: Path,
) -> None:
    server = start(served, tmp_path, "--workers", "2")
    old = server.serving_pids(2)
    load = KeepAliveLoad(server.url, clients=2)
    (tmp_path / "version").write_text("broken")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_log("Reload failed")
    answered = load.ok
    wait_for(lambda: load.ok > answered + 50)
    load.stop()
    assert load.failures == [] and set(load.bodies) == {"1"}
    assert "deliberately broken deploy" in server.log
    assert server.serving_pids(2) == old


def test_max_memory_does_not_count_the_pages_shared_with_the_template(
    served: Callable[..., Served], tmp_path: Path,
) -> None:
    server = start(served, tmp_path, "--workers", "1", "--max-memory", "40", APP_OBJECTS="600000")
    pid = server.get()
    for _ in range(3):
        server.get("/gc")
    uss, rss = unique_memory(pid) or 0, resident_memory(pid) or 0
    assert rss > 40 * MiB > uss, (rss / MiB, uss / MiB)
    deadline = time.monotonic() + 2.0  # four memory samples: not recycled for what it shares
    while time.monotonic() < deadline:
        assert server.get() == pid
        time.sleep(0.05)
    assert "Recycling" not in server.log


def test_max_requests_bound_holds_with_preload_and_a_slow_import(served: Callable[..., Served]) -> None:
    """The one test with a 2 s import: only the template pays it; every replacement is forked
    ready in milliseconds, and a worker serves at most its limit plus one request per connection."""
    limit, clients = 50, 8
    server = served("--workers", "2", "--preload", "--max-requests", str(limit), env={"APP_IMPORT_DELAY": "2"})
    server.serving_pids(2, timeout=30)
    load = KeepAliveLoad(server.url, clients=clients)
    wait_for(lambda: len(load.finished()) >= 4, timeout=60)  # workers that served and exited
    load.stop()
    assert load.failures == []
    gone = load.finished()
    assert len(gone) >= 4 and max(gone.values()) <= limit + clients, (gone, server.log)
    assert len(server.import_log.read_text().split()) == 1  # imported once, in the template
