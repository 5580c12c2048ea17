"""Whom a Unix socket may be trusted to be: the checks on its path and on its peer.

The daemon's socket is found by path, so whoever can write the directory it lives in (or
any directory above it) can put another socket there: an impostor that is then sent
argv, environments and hook commands. A path is trusted only when the socket and every
directory on the way to it belong to root or to one trusted uid, and no one else can
write them; a directory that others may write (`/tmp`) is passed through only when its
sticky bit keeps them from renaming or removing what is not theirs (the rule of OpenSSH's
StrictModes and of sudo's secure path check). The last word is the kernel's: after
connect(), SO_PEERCRED names the uid that listens.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
from pathlib import Path

from monitor.errors import MonitorError

SO_PEERCRED_FORMAT = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7))


class UntrustedSocket(MonitorError):
    """A socket, or a directory on the way to it, that someone else controls."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"untrusted socket {path}: {reason}")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end, in the kernel's words: as of connect() for a client,
    as of listen() for a server (socket(7), SO_PEERCRED)."""
    if sys.platform != "linux":
        raise MonitorError("peer credentials are read with SO_PEERCRED, which needs Linux")
    pid, uid, gid = SO_PEERCRED_FORMAT.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, SO_PEERCRED_FORMAT.size))
    return pid, uid, gid


def _owner(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def check_directory(directory: Path, owners: frozenset[int], *, owner: int | None = None) -> None:
    """`directory` (resolved) and each directory above it belong to one of `owners` and are
    writable by no one else, unless sticky (above it only); `owner`, when given, is the one
    uid the directory itself must belong to."""
    real = Path(os.path.realpath(directory))
    for index, path in enumerate((real, *real.parents)):
        try:
            st = os.stat(path)
        except OSError as err:
            raise UntrustedSocket(directory, f"cannot check {path}: {err.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedSocket(directory, f"{path} is not a directory")
        expected = {owner} if index == 0 and owner is not None else owners
        if st.st_uid not in expected:
            raise UntrustedSocket(directory, f"{path} belongs to {_owner(st.st_uid)}, not to "
                                  + " or ".join(sorted(_owner(u) for u in expected)))
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and (index == 0 or not st.st_mode & stat.S_ISVTX):
            raise UntrustedSocket(directory, f"{path} may be written by others (mode {stat.S_IMODE(st.st_mode):04o})")


def check_socket_path(path: Path, owners: frozenset[int]) -> Path:
    """The socket's real path, once it and the directories to it are found trustworthy.
    FileNotFoundError when there is nothing there (no daemon, which is not an attack)."""
    real = Path(os.path.realpath(path))
    st = os.stat(real)  # FileNotFoundError: no daemon here
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedSocket(path, f"{real} is not a socket")
    if st.st_uid not in owners:
        raise UntrustedSocket(path, f"{real} belongs to {_owner(st.st_uid)}, neither root nor you")
    check_directory(real.parent, owners)
    return real


def check_peer(sock: socket.socket, path: Path, owners: frozenset[int]) -> None:
    """The process that listens on `sock` runs as one of `owners`."""
    _pid, uid, _gid = peer_credentials(sock)
    if uid not in owners:
        raise UntrustedSocket(path, f"the process that answers there runs as {_owner(uid)}, neither root nor you")
