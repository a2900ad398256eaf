"""uvworker: an ASGI/WSGI server — a Gunicorn worker class and a standalone pre-fork server.

Public names are imported lazily so that ``import uvworker`` stays cheap and never imports
Gunicorn: ``uvworker.Worker`` and ``uvworker.H11Worker`` resolve only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Config", "Server", "run", "Worker", "H11Worker", "__version__"]

if TYPE_CHECKING:
    from uvworker.config import Config
    from uvworker.main import run
    from uvworker.server import Server
    from uvworker.workers import H11Worker, Worker

_LAZY = {
    "Config": "uvworker.config",
    "Server": "uvworker.server",
    "run": "uvworker.main",
    "Worker": "uvworker.workers",
    "H11Worker": "uvworker.workers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'uvworker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
