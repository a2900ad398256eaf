"""A generic pre-fork process manager (binds sockets, forks workers, restarts and recycles them).

It knows nothing of HTTP and imports nothing from ``uvworker``. Give it listening sockets and a
worker target (a callable run in each forked child with a ``WorkerContext``); the child reports
over ``context.channel`` (``ready()``, ``heartbeat(requests)``, ``nearing(requests, eta)``,
``holding(requests, reason)``, ``retiring()``) and obeys signals (HUP retire gracefully while
the others serve, TERM stop gracefully, QUIT stop quickly, USR1 reopen logs, USR2 report
memory, ``child.HANDOVER_SIGNAL`` leave at your budget, ``child.SERVE_ON_SIGNAL`` your
replacement failed, serve on; ``supervisor.budget`` keeps a budget).
Heartbeat fields named in ``counter_fields`` are summed over every worker, past and present
(``supervisor.metrics``); ``services`` run in the master's loop beside the workers (e.g. a
metrics endpoint, fed from ``Master.policy``)::

    from supervisor import SupervisorConfig, run
    exit_code = run(target, sockets, SupervisorConfig(workers=4))

With ``SupervisorConfig(preload=load_app)`` the master stays app-free: ``load_app`` runs once in
a template process and every worker is forked from it (``supervisor.forkserver``).

Importing this package has no side effects; names are loaded on first use. (The unrelated PyPI
project "supervisor" — supervisord — installs a package of the same name.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Master", "SupervisorConfig", "SupervisorError", "WorkerContext", "run"]

if TYPE_CHECKING:
    from supervisor.child import WorkerContext
    from supervisor.config import SupervisorConfig, SupervisorError
    from supervisor.master import Master, run

_LAZY = {
    "Master": "supervisor.master",
    "run": "supervisor.master",
    "SupervisorConfig": "supervisor.config",
    "SupervisorError": "supervisor.config",
    "WorkerContext": "supervisor.child",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
