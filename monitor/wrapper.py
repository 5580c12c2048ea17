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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monitor-wrapper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit-dir", required=True, type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--user", type=int, help="run the command as this uid (the wrapper stays as it is)")
    parser.add_argument("--group", type=int, help="and this gid")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command is required after --")
    try:
        # The wrapper keeps its own uid so that only it (and the daemon) can write the
        # exit file; the command runs as the user who launched it.
        child = subprocess.Popen(command, user=args.user, group=args.group,
                                 extra_groups=[] if args.user is not None else None, close_fds=False)
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
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not try again
    if key is not None:
        write_atomically(args.exit_dir / f"{args.id}.exit", {"id": args.id, "key": key.to_dict(), "wait_status": status})
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
