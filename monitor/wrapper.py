"""The launch wrapper: runs one command and records how it ended in an exit file.

    python -m monitor.wrapper --exit-dir DIR --id ID [--go-fd N --ready-fd M] -- CMD [ARG ...]

Forks the command's process and writes DIR/ID.start (its process key) at once, and
DIR/ID.exit (key, raw wait status, and whether it ran) when it ends, each atomically
(temp file, fsync, rename), so the outcome survives a monitor that was down. With
`--go-fd` the forked process waits for the daemon's go before it execs the command:
the daemon stores the session first, so no fork of the command comes before it is
tracked, and a daemon that dies before its go means the command never runs. It
reaps every child (a subreaper: the command's orphans too), forwards TERM, INT and
HUP to the command's process group, and exits with the command's status (exit
code, or 128 + signal) so that a parent sees the same thing. Whatever signal
reaches the command's group, the wrapper (outside it) writes the exit file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError
from monitor.identity import ProcessKey

NOT_STARTED = 125  # the exit status of a command that never got its go


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


LAUNCH_FILES = (".launch", ".start", ".exit")  # what a launch leaves in the exit directory


def remove_launch_files(exit_dir: Path, session_id: str) -> None:
    """A launch's files, once they are evidence of nothing (its stop stored, or it never ran)."""
    for suffix in LAUNCH_FILES:
        with contextlib.suppress(FileNotFoundError):
            (exit_dir / f"{session_id}{suffix}").unlink()


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


def wait_for_go(go_fd: int) -> bool:
    """Block until the daemon says go (one byte) or goes away (EOF): True for go."""
    while True:
        try:
            return os.read(go_fd, 1) == b"g"
        except InterruptedError:
            continue
        except OSError:
            return False


def start_command(command: list[str], args: argparse.Namespace, status_w: int) -> int:
    """Fork the command's process; in it, before exec: join the cgroup (the command and all it
    forks, not the wrapper), lead a session and process group of its own (a stop signals the
    command's group, never the wrapper that must report it), become the user, and wait for the
    daemon's go. Joining comes first: it needs the wrapper's rights."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        if args.ready_fd is not None:
            os.close(args.ready_fd)  # the wrapper's to write; the command must not inherit it
        if args.cgroup is not None:
            with open(args.cgroup / "cgroup.procs", "w") as f:
                f.write("0")
        os.setsid()
        if args.group is not None:
            os.setgroups([])
            os.setgid(args.group)
        if args.user is not None:
            os.setuid(args.user)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.write(status_w, b"s")  # set up: in its cgroup and group, as the user; the key may be given out
        if args.go_fd is not None and not wait_for_go(args.go_fd):
            os.write(status_w, b"n")  # the daemon never registered it: it must not run
            os._exit(NOT_STARTED)
        if args.go_fd is not None:
            os.close(args.go_fd)
        os.execvp(command[0], command)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.write(status_w, b"e")
            os.write(2, f"monitor-wrapper: cannot run {command[0]}: {err.strerror}\n".encode())
    os._exit(127)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monitor-wrapper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit-dir", required=True, type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--user", type=int, help="run the command as this uid (the wrapper stays as it is)")
    parser.add_argument("--group", type=int, help="and this gid")
    parser.add_argument("--cgroup", type=Path, help="a cgroup v2 directory to join first: every descendant is in it")
    parser.add_argument("--go-fd", type=int, help="the command runs only once a byte 'g' is read here (EOF: never)")
    parser.add_argument("--ready-fd", type=int, help="the command's process key is written here (a JSON line) once forked")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command is required after --")
    become_subreaper()
    status_r, status_w = os.pipe()  # close-on-exec (PEP 446): closed by a successful exec: it tells how the start went
    # The wrapper keeps its own uid so that only it (and the daemon) can write the exit
    # file; the command runs as the user who launched it.
    pid = start_command(command, args, status_w)
    os.close(status_w)
    if args.go_fd is not None:
        os.close(args.go_fd)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # gone already, or never ours to signal: its exit is reaped below
            os.killpg(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    set_up = read_start_status(status_r) == b"s"
    try:
        key: ProcessKey | None = ProcessKey.of(pid) if set_up else None
    except MonitorError:
        key = None  # it ended at once; its status is still ours to reap
    if key is not None:
        write_atomically(args.exit_dir / f"{args.id}.start", {"id": args.id, "key": key.to_dict()})
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, json.dumps({"key": key.to_dict() if key else None}).encode() + b"\n")
        os.close(args.ready_fd)
    ran = set_up and read_start_status(status_r) != b"n"
    os.close(status_r)
    status = reap_until(pid)
    if key is not None:
        write_atomically(args.exit_dir / f"{args.id}.exit",
                         {"id": args.id, "key": key.to_dict(), "wait_status": status, "ran": ran})
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def read_start_status(status_r: int) -> bytes:
    """What the command's process says of its start: b"s" once set up, then b"" once it exec'd,
    b"n" when it never got its go, b"e" when its set-up or exec failed."""
    while True:
        try:
            return os.read(status_r, 1)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main())
