"""Run an ASGI 2 application (``app(scope)`` returns ``instance(receive, send)``) as ASGI 3."""

from __future__ import annotations

from typing import Any

from uvworker.interfaces import Receive, Scope, Send


class ASGI2Adapter:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance = self.app(scope)
        await instance(receive, send)
