"""Who belongs to a session now, as the kernel says: its cgroup's members, its tracked
descendants still alive, and signalling those of a stopped session (its orphans).

The tracker decides (pure); this module does the looking and the signalling for the
engine. A launched session's membership is its cgroup: setsid, a double fork or
reparenting cannot leave it. An attached one's is its lineage, as the source followed it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from monitor import cgroups
from monitor.errors import MonitorError
from monitor.identity import ProcessKey, argv_of
from monitor.tracker import Session

log = logging.getLogger(__name__)


def cgroup_members(session: Session) -> list[ProcessKey]:
    """The processes in a launched session's cgroup now, other than its root."""
    if session.cgroup is None:
        return []
    keys = []
    for pid in cgroups.members(Path(session.cgroup)):
        with contextlib.suppress(MonitorError, ValueError):
            key = ProcessKey.of(int(pid))
            if key != session.key:
                keys.append(key)
    return keys


def live_descendants(session: Session, alive: Callable[[ProcessKey], bool]) -> list[tuple[ProcessKey, list[str]]]:
    """The session's descendants alive now, with their command lines: the processes in its
    cgroup (a launched session), and the tracked descendants still running."""
    keys = dict.fromkeys(cgroup_members(session))
    keys.update(dict.fromkeys(c.key for c in session.children.values() if c.state == "running"))
    found = []
    for key in keys:
        with contextlib.suppress(MonitorError):
            if alive(key):
                found.append((key, argv_of(key.pid)))
    return found


def may_signal(uid: int | None, pid: int) -> bool:
    """Whether `uid` could signal `pid` itself (kill(2): its uid equals the target's real or
    saved uid), so that the daemon, acting for a user, does no more than the user could.
    None or 0 (root, or the daemon's own): always."""
    if not uid:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, _effective, saved = (int(v) for v in line.split()[1:4])
                    return uid in (real, saved)
    except (OSError, ValueError):
        pass
    return False


def signal_key(key: ProcessKey, signum: int, as_uid: int | None = None) -> None:
    """Signal this very process through a pidfd opened and then checked against its key,
    so a PID reused since can never be hit; nothing when it is gone, or when `as_uid`
    could not signal it itself."""
    if sys.platform != "linux":
        with contextlib.suppress(OSError, MonitorError):
            if key.is_alive():
                os.kill(key.pid, signum)
        return
    try:
        fd = os.pidfd_open(key.pid)
    except OSError:
        return  # gone already: its Exited is on its way
    try:
        if ProcessKey.of(key.pid) == key and may_signal(as_uid, key.pid):
            signal.pidfd_send_signal(fd, signum)
    except (OSError, MonitorError):
        pass
    finally:
        os.close(fd)


def signal_orphans(session: Session, signum: int) -> None:
    """Each live orphan of a stopped session: through its cgroup when it was launched
    (cgroup.kill for KILL: the launch's cgroup is killed as one, as `session.stop` does),
    else one pidfd per key, only those its owner could signal itself."""
    if session.cgroup is not None and cgroups.signal_all(Path(session.cgroup), signum):
        return
    for orphan in session.live_orphans():
        signal_key(ProcessKey.from_dict(orphan["key"]), signum, session.owner_uid)
