"""Every module a worker may import, imported before the workers fork and switch user.

Why. A worker switched to ``--user`` (Gunicorn's ``user``; often ``nobody``) may be unable to
read the installation: a virtualenv or a pyenv Python under /root or a home directory, a
clone in a mode-0700 directory. Python imports lazily — our modules import some of theirs
inside functions, and the standard library and the packages we use do the same — and a lazy
import after the switch fails in every worker (``ModuleNotFoundError``: a crash loop). So the
process that forks the workers (our supervisor's master, Gunicorn's arbiter) imports, once,
everything a worker may need with the given settings. Then only the application must be
readable by the worker's user, as with Gunicorn's own workers; and the workers share those
pages and start faster.

Rules kept:

* Never the application (``--preload`` is the supervisor's business, not this module's).
* Chosen from the settings: the parser, the event loop, WebSocket support, the interface
  adapters. A package that is not installed is skipped (the worker falls back, or reports
  it, as it would anyway).
* Complete: tests/test_warm_imports.py runs real workers (Gunicorn's and ours) as ``nobody``
  from an installation only root can read, serves HTTP, WebSocket, WSGI, TLS, proxy headers,
  the PROXY protocol, bad requests, an app error and the access log, and fails on any module
  a worker imported after switching user that its app did not import; and it checks that
  every import inside a function of ``uvworker`` is covered here.
* The server's own code is therefore not reloaded by SIGHUP (the application's is).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uvworker.config import Config

__all__ = ["warm_imports", "worker_modules"]

# What every worker runs: the server, and the modules it and Config.load() import inside
# functions. The standard-library and third-party modules those import late need no entry
# today; tests/test_warm_imports.py names any that a worker imports after switching user.
ALWAYS = (
    "uvworker.server",
    "uvworker.lifespan",
    "uvworker.proxy",
    "uvworker.logging",
    "uvworker.importer",
    "uvworker.interfaces",
    "uvworker.inflight",  # prefork.serve_worker: the hung-worker report
)

# interface setting -> the adapters it may need ("auto" detects: any of them)
ADAPTERS = {
    "auto": ("uvworker.interfaces.asgi2", "uvworker.interfaces.wsgi"),
    "asgi2": ("uvworker.interfaces.asgi2",),
    "wsgi": ("uvworker.interfaces.wsgi",),
    "asgi3": (),
}


def worker_modules(config: Config) -> list[str]:
    """Every module a worker with these settings may import (never the app)."""
    modules = [*ALWAYS, *ADAPTERS[config.interface]]
    if config.http in ("auto", "httptools"):
        modules.append("httptools")
    if config.loop in ("auto", "uvloop"):
        modules.append("uvloop")
    if config.ws != "none":
        modules.append("uvworker.protocols.websocket")  # and websockets' pieces, if installed
    if config.http2 is not False and importlib.util.find_spec("h2") is not None:
        modules.append("uvworker.protocols.h2")  # and h2, hpack, hyperframe
    if config.env_file:  # Config.load() reads it in each worker, before importing the app
        modules += ["uvworker.envfile", "dotenv"]
    return modules


def warm_imports(config: Config) -> None:
    """Import every module a worker with these settings may need. A package the settings ask
    for that is not installed is skipped here: ``Config.load()`` in the worker reports it in
    one line, as it would without a user switch."""
    for name in worker_modules(config):
        try:
            importlib.import_module(name)
        except ImportError:
            if name.startswith(("uvworker.", "supervisor.")):
                raise
