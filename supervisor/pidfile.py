"""``--pid FILE``: written at start (refusing a file that names a live process), removed at exit."""

from __future__ import annotations

import errno
import os

from supervisor.config import SupervisorError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # exists, owned by someone else
    return True


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.pid: int | None = None

    def create(self, pid: int) -> None:
        try:
            with open(self.path) as existing:
                content = existing.read().strip()
        except FileNotFoundError:
            content = ""
        except OSError as exc:
            raise SupervisorError(f"Cannot read PID file {self.path}: {exc.strerror}.") from None
        if content.isdigit() and int(content) != pid and _alive(int(content)):
            raise SupervisorError(
                f"PID file {self.path} names process {content}, which is still running; "
                "is another server already started?"
            )
        tmp = f"{self.path}.{pid}.tmp"
        try:
            with open(tmp, "w") as handle:
                handle.write(f"{pid}\n")
            os.replace(tmp, self.path)  # atomic: readers never see a half-written file
        except OSError as exc:
            raise SupervisorError(f"Cannot write PID file {self.path}: {exc.strerror}.") from None
        self.pid = pid

    def remove(self) -> None:
        """Remove the file, but only if it is still ours (another run may have replaced it)."""
        if self.pid is None:
            return
        try:
            with open(self.path) as handle:
                if handle.read().strip() == str(self.pid):
                    os.unlink(self.path)
        except OSError:
            pass
        self.pid = None
