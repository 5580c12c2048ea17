"""cgroup v2 for launched sessions: every descendant in one place, killed as one.

Where a cgroup2 hierarchy is writable, a launch gets `<mount>/monitor/<session id>`; its
wrapper joins it before it starts the command, so nothing the command forks can leave it.
`cgroup.kill` (Linux >= 5.14) then kills every process in it at once, and `cgroup.procs`
names them for other signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import inotify_simple

log = logging.getLogger(__name__)

SWEEP_MIN_AGE_S = 60.0  # an empty cgroup younger than this may be another daemon's launch in progress


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


def populated(path: Path) -> bool | None:
    """Whether a process lives in the cgroup or below it (`cgroup.events`: "populated 0|1",
    Documentation/admin-guide/cgroup-v2.rst); None when it cannot be read (gone)."""
    try:
        text = (path / "cgroup.events").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    return None


def remove_tree(path: Path) -> bool:
    """rmdir an unpopulated cgroup and any child cgroups it has, deepest first; True when it is
    gone. (A cgroup with children cannot go; one with processes neither: EBUSY.)"""
    try:
        children = [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for child in children:
        remove_tree(child)
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class CgroupReaper:
    """Removes session cgroups the moment the kernel says they are empty, and leftovers at
    start-up.

    The kernel modifies `cgroup.events` when `populated` changes (an inotify IN_MODIFY;
    cgroup-v2.rst, "cgroup.events"), so a cgroup whose last process takes minutes to exit
    goes when it does, with no timer and no retry loop. Called on the event loop's thread.
    """

    def __init__(self) -> None:
        self._inotify: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paths: dict[int, Path] = {}  # watch descriptor -> cgroup

    @property
    def waiting(self) -> list[Path]:
        """The cgroups still waiting for their last process."""
        return list(self._paths.values())

    def remove_when_empty(self, path: Path) -> None:
        """Remove `path` now if it is empty, else as soon as `cgroup.events` says it is."""
        if not populated(path) and remove_tree(path):
            return
        if path in self._paths.values():
            return
        try:
            wd = self._notifier().add_watch(str(path / "cgroup.events"), inotify_simple.flags.MODIFY)
        except OSError as err:
            log.warning("cannot watch cgroup %s for its end (%s): it stays until the next start", path, err)
            return
        self._paths[wd] = path
        if not populated(path) and remove_tree(path):  # emptied before the watch was set
            self._forget(wd)

    def sweep(self, keep: set[str], min_age_s: float = SWEEP_MIN_AGE_S) -> list[Path]:
        """At start-up: every session cgroup under `<mount>/monitor/` not in `keep` (paths of
        running sessions) goes if it is empty; a populated one is logged and goes once empty.
        One made less than `min_age_s` ago is left: another daemon on this host may be
        launching into it. The ones removed."""
        mount = cgroup2_mount()
        if mount is None or not (mount / "monitor").is_dir() or not os.access(mount / "monitor", os.W_OK):
            return []  # none made here, or not ours to remove (a daemon that is not root)
        removed = []
        now = time.time()
        for path in sorted(p for p in (mount / "monitor").iterdir() if p.is_dir()):
            if str(path) in keep:
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime < min_age_s:
                    continue
            state = populated(path)
            if state is None:
                continue  # gone meanwhile
            if not state:
                if remove_tree(path):
                    removed.append(path)
                continue
            log.warning("cgroup %s belongs to no running session but still has processes (%s): left, and removed "
                        "once they have exited", path, ", ".join(members(path)) or "?")
            self.remove_when_empty(path)
        if removed:
            log.info("removed %d empty cgroups left by stopped sessions", len(removed))
        return removed

    def close(self) -> None:
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        self._paths.clear()

    def _notifier(self) -> Any:
        if self._inotify is None:
            self._inotify = inotify_simple.INotify()
            os.set_blocking(self._inotify.fileno(), False)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._inotify.fileno(), self._on_events)
        return self._inotify

    def _on_events(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except (BlockingIOError, OSError):
            return
        for event in events:
            path = self._paths.get(event.wd)
            if path is None:
                continue
            if event.mask & inotify_simple.flags.IGNORED:  # the cgroup went (rmdir'd, by us or anyone)
                del self._paths[event.wd]
            elif not populated(path) and remove_tree(path):
                self._forget(event.wd)

    def _forget(self, wd: int) -> None:
        self._paths.pop(wd, None)
        with contextlib.suppress(OSError):
            self._inotify.rm_watch(wd)  # usually gone already with its cgroup (IN_IGNORED)


def members(path: Path) -> list[str]:
    try:
        return (path / "cgroup.procs").read_text().split()
    except OSError:
        return []
