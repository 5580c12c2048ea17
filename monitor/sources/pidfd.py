"""pidfd: one file descriptor per watched process, readable when its thread group is gone.

Needs no privilege (Linux >= 5.3). A pidfd pins the process it was opened for, so
a reused PID can never be mistaken for it (pidfd_open(2)). Exit status: our own
children through waitid(P_PIDFD, WNOWAIT), which leaves the reaping to their
owner; other processes through PIDFD_GET_INFO with PIDFD_INFO_EXIT (Linux >= 6.15,
only once reaped), or field 52 of /proc/PID/stat while a zombie; else None.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct

from monitor.errors import AccessDenied, NoSuchProcess, SourceUnavailable
from monitor.events import PIDFD
from monitor.identity import read_stat, zombie_exit_status
from monitor.sources.base import EventSource, Watch
from monitor.sources.children import ChildScanner

# include/uapi/linux/pidfd.h: struct pidfd_info, PIDFD_INFO_SIZE_VER0 == 64 bytes;
# the kernel accepts any size >= VER0 (the size is part of the ioctl number).
PIDFD_INFO = struct.Struct("=QQ11Ii")
PIDFD_INFO_EXIT = 1 << 3
PIDFS_IOCTL_MAGIC = 0xFF
PIDFD_GET_INFO = (3 << 30) | (PIDFD_INFO.size << 16) | (PIDFS_IOCTL_MAGIC << 8) | 11  # _IOWR(0xFF, 11, ...)

# waitid(2) si_code values (include/uapi/asm-generic/siginfo.h)
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


def open_pidfd(pid: int) -> int:
    """A pidfd for `pid`. NoSuchProcess when it is gone.

    EINVAL for a PID that exists but has just exited is a kernel race (the struct
    pid has no task any more; psutil #2715, systemd PR #36982): it means gone.
    """
    try:
        return os.pidfd_open(pid)
    except OSError as err:
        if err.errno in (errno.ESRCH, errno.EINVAL):
            raise NoSuchProcess(pid) from err
        if err.errno in (errno.EPERM, errno.EACCES):
            raise AccessDenied(f"pidfd_open({pid}): {err.strerror}") from err
        raise


def is_readable(fd: int) -> bool:
    """A pidfd polls readable once the whole thread group has exited (pidfd_poll).

    poll(), not select(): select() refuses fds above FD_SETSIZE (1024), and a
    monitor watching thousands of processes holds that many pidfds.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def exit_info(fd: int) -> int | None:
    """The raw wait status from PIDFD_GET_INFO, once the process has been reaped."""
    buf = bytearray(PIDFD_INFO.size)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(fd, PIDFD_GET_INFO, buf, True)
    except OSError:  # ENOTTY before 6.13; ESRCH for a reaped process without EXIT info
        return None
    fields = PIDFD_INFO.unpack(buf)
    if not fields[0] & PIDFD_INFO_EXIT:
        return None
    return int(fields[-1])


def child_status(fd: int) -> int | None:
    """The raw wait status of our own exited child, without reaping it (WNOWAIT)."""
    try:
        result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # not ours, or already reaped by its owner
        return None
    if result is None:
        return None
    if result.si_code == CLD_EXITED:
        return (result.si_status & 0xFF) << 8
    if result.si_code == CLD_KILLED:
        return result.si_status
    if result.si_code == CLD_DUMPED:
        return result.si_status | 0x80
    return None


def pidfd_exit_status(watch: Watch) -> int | None:
    """The best exit status a pidfd holder can learn for a process found dead."""
    if watch.fd is not None:
        if watch.is_child:
            status = child_status(watch.fd)
            if status is not None:
                return status
        status = exit_info(watch.fd)
        if status is not None:
            return status
    status = zombie_exit_status(watch.key)
    if status is None and watch.fd is not None:
        status = exit_info(watch.fd)  # reaped between the two looks
    return status


def attach_pidfd(watch: Watch) -> None:
    """Open a pidfd for the watched key and check that it names that very process.

    Race-free PID to pidfd: open first, then verify the start time, so the fd
    cannot pin a process that took over the PID (reliability.md §2.1).
    """
    fd = open_pidfd(watch.key.pid)
    stat = read_stat(watch.key.pid)
    if stat is None or stat.start_time_ticks != watch.key.start_time_ticks:
        os.close(fd)
        raise NoSuchProcess(watch.key.pid, f"process {watch.key} is gone (its PID was reused)")
    watch.fd = fd
    watch.is_child = stat.ppid == os.getpid()


def probe() -> str | None:
    """None when pidfds work here, else why not."""
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (needs Linux and Python >= 3.9)"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as err:
        return f"pidfd_open failed: {err.strerror} (Linux >= 5.3 needed; seccomp may block it)"
    return None


class PidfdSource(EventSource):
    """Exit events for watched processes from one pidfd each, on the asyncio loop."""

    name = "pidfd"

    def __init__(self, *, all_events: bool = False, child_scan_interval_s: float = 0.5) -> None:
        if all_events:
            raise SourceUnavailable("pidfd", "sees only watched processes; streaming every process needs netlink")
        super().__init__()
        self._children = ChildScanner(self, child_scan_interval_s)

    async def _start(self) -> None:
        reason = probe()
        if reason is not None:
            raise SourceUnavailable(self.name, reason)

    async def _close(self) -> None:
        await self._children.close()

    def _attach(self, watch: Watch) -> None:
        attach_pidfd(watch)
        assert self._loop is not None and watch.fd is not None
        self._loop.add_reader(watch.fd, self._on_exit, watch)
        if watch.descendants:
            self._children.ensure_running()

    def _release(self, watch: Watch) -> None:
        if watch.fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(watch.fd)
            os.close(watch.fd)
            watch.fd = None

    def _alive(self, watch: Watch) -> bool:
        if watch.fd is None:
            return watch.key.is_alive()
        return not is_readable(watch.fd)

    def _exit_status(self, watch: Watch) -> int | None:
        return pidfd_exit_status(watch)

    def _on_exit(self, watch: Watch) -> None:
        if self._watches.get(watch.key.pid) is watch:
            self._finish(watch, pidfd_exit_status(watch), PIDFD)

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "open_fds": sum(1 for w in self._watches.values() if w.fd is not None)}
