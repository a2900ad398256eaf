"""The lifespan protocol driven directly (no server): outcomes of startup() per mode, state,
shutdown, and the messages logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from uvworker.lifespan import Lifespan

logger = logging.getLogger("uvworker.error")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def run_lifespan(app: Any, mode: str = "auto") -> tuple[bool, Lifespan]:
    """Start and stop ``app``'s lifespan on a fresh event loop."""

    async def main() -> tuple[bool, Lifespan]:
        lifespan = Lifespan(app, mode, logger)  # type: ignore[arg-type]
        ok = await lifespan.startup()
        await lifespan.shutdown()
        return ok, lifespan

    return asyncio.run(main())


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def full_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """A well-behaved app that records what it saw."""
    assert (await receive())["type"] == "lifespan.startup"
    scope["state"]["events"] = [scope["asgi"], "startup"]
    await send({"type": "lifespan.startup.complete"})
    assert (await receive())["type"] == "lifespan.shutdown"
    scope["state"]["events"].append("shutdown")
    await send({"type": "lifespan.shutdown.complete"})


def test_complete_startup_and_shutdown_share_state(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "uvworker.error")
    ok, lifespan = run_lifespan(full_app)
    assert ok
    assert lifespan.state["events"] == [
        {"version": "3.0", "spec_version": "2.0"},
        "startup",
        "shutdown",
    ]
    assert messages(caplog, logging.INFO) == [
        "Waiting for application startup.",
        "Application startup complete.",
        "Waiting for application shutdown.",
        "Application shutdown complete.",
    ]


def test_one_task_spans_the_servers_life() -> None:
    """A context entered at startup is exited at shutdown, in the same task."""
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        seen.append(asyncio.current_task())
        try:
            await send({"type": "lifespan.startup.complete"})
            await receive()
        finally:
            seen.append(asyncio.current_task())
        await send({"type": "lifespan.shutdown.complete"})

    ok, _ = run_lifespan(app)
    assert ok and len(seen) == 2 and seen[0] is seen[1]


@pytest.mark.parametrize("returns", [False, True], ids=["raises", "returns"])
def test_auto_mode_tolerates_apps_without_lifespan(
    caplog: pytest.LogCaptureFixture, returns: bool
) -> None:
    async def http_only_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if not returns:
            assert scope["type"] == "http"

    caplog.set_level(logging.INFO, "uvworker.error")
    ok, _ = run_lifespan(http_only_app, "auto")
    assert ok
    assert "ASGI 'lifespan' protocol appears unsupported." in messages(caplog, logging.INFO)
    assert messages(caplog, logging.ERROR) == []


def test_on_mode_exception_fails_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raise RuntimeError("database unreachable")

    ok, _ = run_lifespan(app, "on")
    assert not ok
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info and "database unreachable" in str(record.exc_info[1])


def test_on_mode_app_returning_early_fails(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()

    ok, _ = run_lifespan(app, "on")
    assert not ok
    assert messages(caplog, logging.ERROR) == [
        "The ASGI app returned before completing lifespan startup."
    ]


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_startup_failed_logs_the_apps_message(
    caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no config"})
        raise RuntimeError("reported already")  # as Starlette does: no second traceback

    ok, _ = run_lifespan(app, mode)
    assert not ok
    assert messages(caplog, logging.ERROR) == ["no config"]


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_an_app_that_answers_lifespan_as_http(caplog: pytest.LogCaptureFixture, mode: str) -> None:
    """An app that serves every scope as HTTP does not speak lifespan: mode "auto" starts
    without it, as uvicorn does (before, the server refused to start: exit code 3); mode
    "on" fails, with the message that tells why."""
    caplog.set_level(logging.INFO, "uvworker.error")

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200})

    ok, _ = run_lifespan(app, mode)
    if mode == "auto":
        assert ok
        assert "ASGI 'lifespan' protocol appears unsupported." in messages(caplog, logging.INFO)
        assert not messages(caplog, logging.ERROR)
    else:
        assert not ok
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "Unexpected ASGI message 'http.response.start'" in str(record.exc_info[1])


@pytest.mark.parametrize("failure", ["message", "exception"])
def test_shutdown_failures_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if failure == "exception":
            raise OSError("pool already closed")
        await send({"type": "lifespan.shutdown.failed", "message": "flush failed"})

    ok, _ = run_lifespan(app)
    assert ok
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    if failure == "message":
        assert record.getMessage() == "flush failed"
    else:
        assert record.exc_info and "pool already closed" in str(record.exc_info[1])


def test_shutdown_ends_a_task_left_after_failed_startup() -> None:
    cancelled: list[bool] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed"})
        try:
            await asyncio.Event().wait()  # never returns by itself
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        lifespan = Lifespan(app, "on", logger)
        assert not await lifespan.startup()
        await lifespan.shutdown()
        assert cancelled == [True]  # before asyncio.run() would cancel leftovers itself

    asyncio.run(main())


def test_off_mode_never_calls_the_app() -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raise AssertionError("called")

    ok, lifespan = run_lifespan(app, "off")
    assert ok and lifespan.state == {}
