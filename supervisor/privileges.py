"""``--user``/``--group``: resolved in the master at start (errors early), applied in each worker.

The master keeps root so it can remove root-owned files at exit and fork workers that bind
nothing themselves; workers drop to the user before running any application code.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from supervisor.config import SupervisorError


@dataclass(frozen=True)
class Identity:
    uid: int | None
    gid: int | None
    user_name: str | None


def resolve(user: str | int | None, group: str | int | None) -> Identity:
    if user is None and group is None:
        return Identity(None, None, None)
    if os.geteuid() != 0:
        raise SupervisorError("--user and --group need the server to be started as root.")
    uid = gid = None
    name = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
        except KeyError:
            raise SupervisorError(f"There is no user {user!r} on this system.") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
        except KeyError:
            raise SupervisorError(f"There is no group {group!r} on this system.") from None
    return Identity(uid, gid, name)


def give(path: str, identity: Identity) -> None:
    """Hand a file the master made (a unix socket) to the identity, as Gunicorn does, so that
    its mode (--umask) lets that user and group in."""
    if identity.uid is not None or identity.gid is not None:
        os.chown(path, -1 if identity.uid is None else identity.uid, -1 if identity.gid is None else identity.gid)


def drop(identity: Identity) -> None:
    """Switch this process to the identity (group first: after setuid we could not change it)."""
    if identity.gid is not None:
        if identity.user_name is not None:
            os.initgroups(identity.user_name, identity.gid)
        else:
            os.setgroups([identity.gid])
        os.setgid(identity.gid)
    if identity.uid is not None:
        os.setuid(identity.uid)
