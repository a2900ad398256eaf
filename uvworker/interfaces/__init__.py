"""Application interfaces: recognise what kind of application was given, adapt it to ASGI 3.

Adding an interface (WSGI, say) means: a choice in ``settings.py`` (``--interface``), an entry
in ``ADAPTERS`` and, if it can be recognised, a rule in ``detect_interface``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def detect_interface(app: Any) -> str:
    """"asgi2" for a class or a one-argument callable (``app(scope)``), else "asgi3"."""
    if inspect.isclass(app):
        return "asgi3" if hasattr(app, "__await__") else "asgi2"
    call = app if inspect.isroutine(app) else getattr(app, "__call__", None)
    if inspect.iscoroutinefunction(call):
        return "asgi3"
    try:
        parameters = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return "asgi3"
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 1 and all(p.kind != p.VAR_POSITIONAL for p in parameters):
        return "asgi2"
    return "asgi3"


def _asgi2(app: Any) -> ASGIApp:
    from uvworker.interfaces.asgi2 import ASGI2Adapter

    return ASGI2Adapter(app)


ADAPTERS: dict[str, Callable[[Any], ASGIApp]] = {"asgi3": lambda app: app, "asgi2": _asgi2}


def as_asgi3(app: Any, interface: str) -> ASGIApp:
    """``app`` as an ASGI 3 callable; ``interface`` "auto" detects it."""
    if interface == "auto":
        interface = detect_interface(app)
    return ADAPTERS[interface](app)
