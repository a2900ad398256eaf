"""The ASGI lifespan protocol.

The app's lifespan coroutine runs as one task from startup() to shutdown(), so it can hold
resources (connection pools, ``async with`` blocks) for the server's whole life.

What startup() returns (False: the server must exit with code 3):
    the app sends lifespan.startup.complete             True
    the app sends lifespan.startup.failed               False; its message logged at ERROR
    the app raises or returns before sending anything   mode "auto": True, the protocol is
    (or sends a message that is not a lifespan answer:  taken as unsupported (logged at INFO);
    an app that serves every scope as HTTP)             mode "on": False, logged at ERROR
    mode "off"                                          True; the app is never called
    abandon() while the server waits (a forced exit)    True; the server is stopping anyway
abandon() is the way out of an app that never answers startup or shutdown (a database that is
down): the lifespan task is cancelled and the wait ends.
An unexpected message raises RuntimeError inside the app's send(); any exception that ends the
app's coroutine is logged with its traceback (unless the app reported the failure itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

Message = dict[str, Any]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

# The messages the app may send in each phase: (success, failure).
_ANSWERS = {
    "startup": ("lifespan.startup.complete", "lifespan.startup.failed"),
    "shutdown": ("lifespan.shutdown.complete", "lifespan.shutdown.failed"),
}


class Lifespan:
    """Runs ``app``'s lifespan protocol; ``state`` is the scope's "state" dict, which the
    server shallow-copies into every request scope (a dict even with mode "off")."""

    def __init__(
        self, app: ASGIApp, mode: Literal["auto", "on", "off"], logger: logging.Logger
    ) -> None:
        self.app = app
        self.mode = mode
        self.logger = logger
        self.state: dict[str, Any] = {}
        # idle -> startup -> running -> shutdown -> done; "failed" after a *.failed message
        self._phase = "idle"
        self._sent = False
        self._unsupported = False
        self._abandoned = False
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> bool:
        """Start the app's lifespan task and wait for its answer to lifespan.startup."""
        if self.mode == "off":
            return True
        self.logger.info("Waiting for application startup.")
        self._phase = "startup"
        self._queue.put_nowait({"type": "lifespan.startup"})
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._started.wait()
        if self._abandoned:
            return True
        if self._phase == "running":
            self.logger.info("Application startup complete.")
            return True
        return self._unsupported

    async def shutdown(self) -> None:
        """Send lifespan.shutdown if the app is running and wait for its answer; then make
        sure the task is over. Never raises; call it after a failed startup too."""
        task = self._task
        if task is None:
            return
        if self._phase == "running" and not task.done():
            self.logger.info("Waiting for application shutdown.")
            self._phase = "shutdown"
            self._queue.put_nowait({"type": "lifespan.shutdown"})
            await self._stopped.wait()
            if self._phase == "done":
                self.logger.info("Application shutdown complete.")
        if not task.done():  # an app lingering after its answer, or after a failed startup
            task.cancel()
            await asyncio.wait({task})

    def abandon(self) -> None:
        """Stop waiting for the app's answer to startup or shutdown: cancel the lifespan task
        (again at each call, for an app that catches the first cancellation)."""
        task = self._task
        if self._phase in ("startup", "shutdown") and task is not None and not task.done():
            self.logger.warning("Application %s cancelled: forced exit.", self._phase)
            self._abandoned = True
            task.cancel()

    async def _run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._queue.get, self._send)
        except Exception as exc:
            self._ended(exc)
        else:
            self._ended(None)
        finally:
            self._started.set()
            self._stopped.set()

    def _ended(self, error: Exception | None) -> None:
        """The app's coroutine is over: log what that means in the current phase."""
        if self._phase == "startup" and self.mode == "auto" and not self._sent:
            self._unsupported = True
            self.logger.info("ASGI 'lifespan' protocol appears unsupported.")
        elif error is not None and self._phase != "failed":
            self.logger.error("Exception in the ASGI 'lifespan' protocol.", exc_info=error)
        elif self._phase == "startup":
            self.logger.error("The ASGI app returned before completing lifespan startup.")

    async def _send(self, message: Message) -> None:
        phase, kind = self._phase, message.get("type")
        if kind not in _ANSWERS.get(phase, ()):
            raise RuntimeError(f"Unexpected ASGI message {kind!r} in the lifespan {phase!r} phase.")
        self._sent = True
        if kind == _ANSWERS[phase][1]:
            self._phase = "failed"
            self.logger.error(message.get("message") or f"Application {phase} failed.")
        else:
            self._phase = "running" if phase == "startup" else "done"
        (self._started if phase == "startup" else self._stopped).set()
