"""What another user may do to a path, in the kernel's words: checked as that user.

The daemon runs as root, and root passes every permission check, so its own access(2)
says nothing about a user. The check runs in a short-lived child that has taken the
user's uid, gid and supplementary groups (set by subprocess in C between fork and exec,
no Python in the child) and then asks access(2) through test(1): the kernel's whole rule,
with ACLs, read-only mounts, search permission on every directory on the way, and the
user's groups, rather than an imitation of it. A child, not a thread: set*id(2) changes
every thread of a process (glibc makes it so, nptl(7)).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

TEST = shutil.which("test") or "/usr/bin/test"
CHECK_TIMEOUT_S = 10.0  # a path on a hung network file system answers no
FLAGS = {os.R_OK: "-r", os.W_OK: "-w", os.X_OK: "-x"}


def groups_of(uid: int, gid: int) -> list[int]:
    """The supplementary groups a login of `uid` gets (group(5), initgroups(3)), with `gid`."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return [gid]  # no passwd entry: only the group the kernel told us
    return sorted(set(os.getgrouplist(name, gid)))


def can_access(uid: int, gid: int, path: str, mode: int) -> bool:
    """Whether `uid` (with group `gid` and its login's groups) may `mode` (os.R_OK, W_OK or
    X_OK) `path`. Blocking (a fork and an exec): call it off the event loop."""
    if uid == os.geteuid():  # ourselves (a user's own daemon): no one to become
        return os.access(path, mode)
    try:
        done = subprocess.run([TEST, FLAGS[mode], path], user=uid, group=gid, extra_groups=groups_of(uid, gid),
                              env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, close_fds=True, timeout=CHECK_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return False  # cannot become that user (not root), or no answer: not allowed
    return done.returncode == 0
