"""Process titles (``ps``/``top`` show "uvworker: worker 2 [app:app]"), via setproctitle if installed."""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # optional: titles are a convenience, never a requirement
    _setproctitle = None


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle(title)


def master_title(proc_name: str, label: str) -> str:
    return _titled(proc_name, "master", label)


def worker_title(proc_name: str, number: int, label: str) -> str:
    return _titled(proc_name, f"worker {number}", label)


def template_title(proc_name: str, generation: int, label: str) -> str:
    return _titled(proc_name, f"template {generation}", label)


def spare_title(proc_name: str, generation: int, label: str) -> str:
    """A worker forked ahead by template ``generation``, waiting to be asked for."""
    return _titled(proc_name, f"spare {generation}", label)


def _titled(proc_name: str, role: str, label: str) -> str:
    return f"{proc_name}: {role} [{label}]" if label else f"{proc_name}: {role}"
