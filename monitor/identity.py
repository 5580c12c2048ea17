"""Process identity: `ProcessKey`, reading `/proc` (or psutil), and `is_alive`.

A PID alone names nobody: PIDs wrap in seconds under a fork storm (pid_max is
32768 on small machines). A process is named by (pid, start time, boot id), the
triple runc and psutil use; a reused PID never matches an old key.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any

from monitor.errors import AccessDenied, NoSuchProcess

HAVE_PROC = os.path.exists("/proc/self/stat")


@functools.cache
def boot_id() -> str:
    """This boot's identity: a key from another boot never names a live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import psutil  # macOS and other systems without /proc

        return f"boot-{int(psutil.boot_time())}"


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of `/proc/PID/stat` (proc(5)) that identity and exit status need."""

    pid: int
    state: str
    ppid: int
    num_threads: int
    start_time_ticks: int
    exit_status: int  # field 52: raw wait status, meaningful only once the process is a zombie

    @property
    def defunct(self) -> bool:
        """The whole thread group is gone (a zombie waiting for its parent, or dying).

        A zombie *leader* with live threads (main called pthread_exit) also shows
        state Z, so the thread count must be checked too: the zombie leader itself
        still counts as one (signal->nr_threads drops only when a task is released).
        """
        return self.state in "ZXx" and self.num_threads <= 1


def parse_stat(pid: int, text: str) -> ProcStat:
    """Parse one `/proc/PID/stat` line; the command name may hold spaces and ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3; field N is rest[N - 3].
    exit_status = int(rest[49]) if len(rest) > 49 else 0
    return ProcStat(
        pid=pid,
        state=rest[0],
        ppid=int(rest[1]),
        num_threads=int(rest[17]),
        start_time_ticks=int(rest[19]),
        exit_status=exit_status,
    )


def read_stat(pid: int) -> ProcStat | None:
    """`/proc/PID/stat`, or None when no such PID exists now."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError as err:
        raise AccessDenied(f"cannot read /proc/{pid}/stat: {err}") from err
    if not data:  # the task was released while we read
        return None
    return parse_stat(pid, data.decode("utf-8", "replace"))


def _psutil_start(pid: int) -> tuple[int, bool]:
    """(start time in microseconds since the epoch, defunct) from psutil."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            start = round(proc.create_time() * 1_000_000)
            defunct = proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and _threads(proc) <= 1
    except psutil.NoSuchProcess as err:
        raise NoSuchProcess(pid) from err
    except psutil.AccessDenied as err:
        raise AccessDenied(f"cannot read process {pid}: {err}") from err
    return start, defunct


def _threads(proc: Any) -> int:
    """Thread count, for the zombie-leader case (see ProcStat.defunct); 1 if unknowable."""
    import psutil

    try:
        return int(proc.num_threads())
    except (psutil.Error, OSError):
        return 1


@dataclass(frozen=True, slots=True)
class ProcessKey:
    """The identity of one process: its PID, its start time and the boot it ran in.

    `start_time_ticks` is field 22 of `/proc/PID/stat` (clock ticks after boot) on
    Linux; where there is no /proc (macOS) it is psutil's create time in
    microseconds since the epoch. Either way it only has to be equal for the same
    process and differ for a process that reused the PID.

    A stream of every process on the host (netlink's all-events mode) cannot afford
    to read /proc for each event, and often could not (the process is gone); its
    events name unwatched processes with `start_time_ticks=None`. Such a key names
    a PID at one instant, is never equal to a complete key, and is not an identity.
    """

    pid: int
    start_time_ticks: int | None  # None: seen only in passing by an all-events stream
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessKey:
        """The key of the process that has `pid` now; NoSuchProcess when there is none.

        A zombie still has a key (it exists until reaped), and `is_alive()` is False for it.
        """
        if pid <= 0:
            raise NoSuchProcess(pid, f"PID must be a positive integer, got {pid}")
        if HAVE_PROC:
            stat = read_stat(pid)
            if stat is None:
                raise NoSuchProcess(pid)
            return cls(pid, stat.start_time_ticks, boot_id())
        start, _ = _psutil_start(pid)
        return cls(pid, start, boot_id())

    def is_alive(self) -> bool:
        """True when this very process exists and its thread group is not dead.

        A zombie is dead (its files are closed; only its exit status remains).
        """
        if self.start_time_ticks is None:
            raise ValueError(f"key {self} has no start time: it names a PID in passing, not a process")
        if self.boot_id != boot_id():
            return False
        if HAVE_PROC:
            stat = read_stat(self.pid)
            return stat is not None and stat.start_time_ticks == self.start_time_ticks and not stat.defunct
        try:
            start, defunct = _psutil_start(self.pid)
        except NoSuchProcess:
            return False
        return start == self.start_time_ticks and not defunct

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time_ticks": self.start_time_ticks, "boot_id": self.boot_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessKey:
        try:
            start = data["start_time_ticks"]
            return cls(int(data["pid"]), None if start is None else int(start), str(data["boot_id"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a process key: {data!r}") from err

    def __str__(self) -> str:
        return f"{self.pid}@{'?' if self.start_time_ticks is None else self.start_time_ticks}"


def zombie_exit_status(key: ProcessKey) -> int | None:
    """The raw wait status of `key` while it is a zombie, or None when it cannot be known.

    Field 52 of /proc/PID/stat is printed as 0 to readers without ptrace read access
    (fs/proc/array.c: do_task_stat), so it is trusted only where that access is
    certain: as root, or for a process of our own uid.
    """
    if not HAVE_PROC or sys.platform != "linux":
        return None
    stat = read_stat(key.pid)
    if stat is None or key.start_time_ticks is None or stat.start_time_ticks != key.start_time_ticks or not stat.defunct:
        return None
    if os.geteuid() != 0:
        try:
            if os.stat(f"/proc/{key.pid}").st_uid != os.geteuid():
                return None
        except OSError:
            return None
    return stat.exit_status


def children_of(pid: int) -> list[int]:
    """The PIDs of the processes whose parent is `pid` now (empty when it is gone).

    Each thread's `/proc/PID/task/TID/children` lists the children that thread forked
    (proc(5); Linux >= 3.5 with CONFIG_PROC_CHILDREN), so every thread is read. Where
    that file is missing, psutil scans the whole process table instead.
    """
    if HAVE_PROC and os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        found: list[int] = []
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    found += [int(p) for p in f.read().split()]
            except OSError:  # the thread ended while we read
                continue
        return found
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def argv_of(pid: int) -> list[str]:
    """The command line of `pid` (empty when gone, or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        import psutil

        try:
            return list(psutil.Process(pid).cmdline())
        except psutil.Error:
            return []
