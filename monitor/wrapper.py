"""The launch wrapper: runs one command and records how it ended in an exit file.

    python -m monitor.wrapper --exit-dir DIR --id ID -- CMD [ARG ...]

Writes DIR/ID.start (the command's process key) once it runs, and DIR/ID.exit
(key and raw wait status) when it ends, each atomically (temp file, fsync,
rename), so the outcome survives a monitor that was down. It reaps its one child,
forwards TERM, INT and HUP to it, and exits with the command's status
(exit code, or 128 + signal) so that a parent sees the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError
from monitor.identity import ProcessKey


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def become_subreaper() -> None:
    """Orphans of the command come to us, not to PID 1 (which may not reap them)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap_until(pid: int) -> int:
    """Reap every child that ends (the command's orphans too) until `pid` does; its status."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:  # someone else reaped it: nothing more can be known
            return 0
        if done == pid:
            return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monitor-wrapper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit-dir", required=True, type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--user", type=int, help="run the command as this uid (the wrapper stays as it is)")
    parser.add_argument("--group", type=int, help="and this gid")
    parser.add_argument("--cgroup", type=Path, help="a cgroup v2 directory to join first: every descendant is in it")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command is required after --")
    become_subreaper()
    procs = str(args.cgroup / "cgroup.procs") if args.cgroup is not None else None

    def enter() -> None:
        """In the child, before exec: join the cgroup (the command and all it forks, not the
        wrapper), then become the user. In this order: joining needs the wrapper's rights."""
        if procs is not None:
            with open(procs, "w") as f:
                f.write("0")
        if args.group is not None:
            os.setgroups([])
            os.setgid(args.group)
        if args.user is not None:
            os.setuid(args.user)

    try:
        # The wrapper keeps its own uid so that only it (and the daemon) can write the
        # exit file; the command runs as the user who launched it.
        child = subprocess.Popen(command, close_fds=False, preexec_fn=enter)
    except OSError as err:
        print(f"monitor-wrapper: cannot run {command[0]}: {err.strerror}", file=sys.stderr)
        return 127
    pid = child.pid
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: os.kill(pid, s))
    try:
        key = ProcessKey.of(pid)
    except MonitorError:
        key = None  # it ended at once; its status is still ours to reap
    if key is not None:
        write_atomically(args.exit_dir / f"{args.id}.start", {"id": args.id, "key": key.to_dict()})
    status = reap_until(pid)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not try again
    if key is not None:
        write_atomically(args.exit_dir / f"{args.id}.exit", {"id": args.id, "key": key.to_dict(), "wait_status": status})
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
