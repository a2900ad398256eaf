"""Application interfaces: recognise what kind of application was given, adapt it to ASGI 3.

Adding an interface means: a choice in ``settings.py`` (``--interface``), an entry in
``ADAPTERS`` and, if it can be recognised, a rule in ``detect_interface``.
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
    """"asgi2" for a class or a one-argument callable (``app(scope)``), "wsgi" for a plain
    (not async) callable of two arguments (``app(environ, start_response)``), else "asgi3"."""
    if inspect.isclass(app):
        if hasattr(app, "__await__"):
            return "asgi3"
        return "wsgi" if _positional(app) == 2 else "asgi2"  # PEP 3333 allows a class too
    call = app if inspect.isroutine(app) else getattr(app, "__call__", None)
    if inspect.iscoroutinefunction(call):
        return "asgi3"
    count = _positional(app)
    if count == 1:
        return "asgi2"
    if count == 2:
        return "wsgi"
    return "asgi3"


def _positional(app: Any) -> int | None:
    """How many positional parameters ``app`` takes; None for *args or no signature."""
    try:
        parameters = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def _asgi2(app: Any, config: Any) -> ASGIApp:
    from uvworker.interfaces.asgi2 import ASGI2Adapter

    return ASGI2Adapter(app)


def _wsgi(app: Any, config: Any) -> ASGIApp:
    from uvworker.interfaces.wsgi import DEFAULT_QUEUE, DEFAULT_THREADS, WSGIAdapter

    workers = getattr(config, "workers", None)
    return WSGIAdapter(
        app,
        threads=getattr(config, "wsgi_threads", DEFAULT_THREADS),
        queue_size=getattr(config, "wsgi_queue", DEFAULT_QUEUE),
        multiprocess=workers is None or workers > 1,
    )


# Each adapter gets the app and the Config (or None) for its own settings.
ADAPTERS: dict[str, Callable[[Any, Any], ASGIApp]] = {
    "asgi3": lambda app, config: app,
    "asgi2": _asgi2,
    "wsgi": _wsgi,
}


def as_asgi3(app: Any, interface: str, config: Any = None) -> ASGIApp:
    """``app`` as an ASGI 3 callable; ``interface`` "auto" detects it."""
    if interface == "auto":
        interface = detect_interface(app)
    return ADAPTERS[interface](app, config)
