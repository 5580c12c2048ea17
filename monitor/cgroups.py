"""cgroup v2 for launched sessions: every descendant in one place, killed as one.

Where a cgroup2 hierarchy is writable, a launch gets `<mount>/monitor/<session id>`; its
wrapper joins it before it starts the command, so nothing the command forks can leave it.
`cgroup.kill` (Linux >= 5.14) then kills every process in it at once, and `cgroup.procs`
names them for other signals.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from pathlib import Path


@functools.cache
def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid systems)."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return Path(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def create(session_id: str) -> Path | None:
    """A cgroup for a session, or None where none can be made (not root, read-only, no cgroup2)."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    path = mount / "monitor" / session_id
    try:
        path.mkdir(parents=True)
    except OSError:
        return None
    return path


def path_of(session_id: str) -> Path | None:
    """The session's cgroup, if it has one."""
    mount = cgroup2_mount()
    path = mount / "monitor" / session_id if mount is not None else None
    return path if path is not None and path.is_dir() else None


def signal_all(path: Path, signum: int) -> bool:
    """Signal every process in the cgroup; True if the cgroup took it."""
    if signum == signal.SIGKILL and (path / "cgroup.kill").exists():
        try:
            (path / "cgroup.kill").write_text("1")
            return True
        except OSError:
            pass
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return False
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    return bool(pids)


def remove(path: Path) -> None:
    """Remove an emptied cgroup (it cannot go while a process is in it)."""
    with contextlib.suppress(OSError):
        path.rmdir()
