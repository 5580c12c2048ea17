"""PIDs from clients in other PID namespaces, translated to the daemon's own.

A PID names a process only within one PID namespace: `monitor attach 7` from inside a
container means its 7, which on the host is some other number, while the host's 7 is
someone else entirely. The kernel translates the peer's own PID for SO_PEERCRED, but not
the numbers a client writes in a request. The `NSpid:` line of /proc/PID/status lists a
process's PID in each namespace from the one of that /proc down to its own (proc(5),
since Linux 4.1), so the process a peer calls N is the one in the peer's namespace whose
last NSpid entry is N.
"""

from __future__ import annotations

import os

from monitor.errors import MonitorError, NoSuchProcess


class ForeignNamespace(MonitorError):
    """A PID from another namespace that cannot be told as one of ours."""


def pid_namespace(pid: int | str) -> str:
    """The namespace's identity, e.g. 'pid:[4026531836]' (namespaces(7)); OSError when gone."""
    return os.readlink(f"/proc/{pid}/ns/pid")


def nspid(pid: int | str) -> list[int]:
    """The process's PID in each namespace, outermost first: the NSpid: line of its status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(n) for n in line.split()[1:]]
    raise ForeignNamespace("this kernel does not tell PIDs in other namespaces (no NSpid in /proc/PID/status)")


def translate(peer_pid: int, pid: int) -> int:
    """The daemon's PID for the process that the peer (by its PID, from SO_PEERCRED) calls
    `pid`: the same number when the peer shares our namespace. NoSuchProcess when the peer's
    namespace has no such process; ForeignNamespace when the peer's namespace cannot be told."""
    if peer_pid <= 0:  # SO_PEERCRED gives 0 for a peer our namespace cannot see
        raise ForeignNamespace("your PID namespace is not visible to the daemon: attach by PID from the daemon's namespace")
    try:
        theirs = pid_namespace(peer_pid)
        ours = pid_namespace("self")
    except OSError:
        raise ForeignNamespace("cannot tell your PID namespace (did the client exit?)") from None
    if theirs == ours:
        return pid
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if pid_namespace(name) == theirs and nspid(name)[-1] == pid:
                return int(name)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    raise NoSuchProcess(pid, f"no process with PID {pid} in your PID namespace")
