"""Launching a session: lock first, then the wrapper, in a process group of its own.

    lock (atomic, before the spawn) -> wrapper (python -m monitor.wrapper) -> command

The wrapper keeps the daemon's uid, so that only it writes the exit file (which
survives a daemon that was down), and runs the command as the user who asked.
The session follows the command itself, not the wrapper: a killed wrapper does
not orphan the command out of its session or its lock. Output goes to a log file
that belongs to that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from monitor import cgroups
from monitor.engine import Engine
from monitor.errors import AccessDenied, MonitorError
from monitor.identity import ProcessKey
from monitor.tracker import Session, new_session_id

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0


class LaunchFailed(MonitorError):
    pass


def open_log(path: Path, uid: int, gid: int, *, chosen: bool) -> int:
    """The log file for a launch, opened for appending on behalf of `uid`.

    A path the user chose (the daemon may be root) must be the user's own file, or a new
    one in a directory of the user's, and is never followed through a symlink at its end;
    the daemon's own log directory gets a new file for each session.
    """
    if not path.is_absolute():
        raise ValueError(f"the log path must be absolute: {path}")
    if chosen and uid != os.geteuid():
        target = path if path.exists() else path.parent
        try:
            owner = os.stat(os.path.realpath(target)).st_uid
        except OSError as err:
            raise ValueError(f"cannot use {path} for the log: {err.strerror}") from None
        if owner != uid:
            raise AccessDenied(f"{target} is not yours: the log must go to your own file or directory")
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if chosen else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as err:
        raise ValueError(f"cannot open the log {path}: {err.strerror}") from None
    if uid != os.geteuid():
        os.fchown(fd, uid, gid)
    return fd


class Launcher:
    def __init__(self, engine: Engine, exit_dir: Path, log_dir: Path) -> None:
        self.engine = engine
        self.exit_dir = exit_dir
        self.log_dir = log_dir
        self._wrappers: dict[int, subprocess.Popen[bytes]] = {}  # reaped when their pidfd is readable
        self._waiting: set[asyncio.Task[int]] = set()

    async def launch(self, argv: list[str], *, cwd: str, env: dict[str, str], uid: int, gid: int, lock: bool = True,
                     force: bool = False, log: str | None = None, **options: Any) -> Session:
        """Lock `cwd` (unless told not to), then spawn `argv` there as `uid` under the wrapper,
        and register it; `options` are the session's (labels, policy, timeout_s, hooks, ...)."""
        if not argv:
            raise ValueError("a command is needed")
        directory = os.path.realpath(cwd)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory} is not a directory")
        session_id = new_session_id()
        locked = lock and not force
        if locked:
            await self.engine.reserve_lock(directory, session_id, uid)
        try:
            return await self._start(argv, directory, env, uid, gid, locked, session_id, log, options)
        except BaseException:
            if locked:
                with contextlib.suppress(MonitorError):
                    if self.engine.locks.locks.get(directory) is not None and self.engine.locks.locks[directory].owner is None:
                        await self.engine.unlock(directory)
            raise

    async def _start(self, argv: list[str], directory: str, env: dict[str, str], uid: int, gid: int, lock: bool,
                     session_id: str, log: str | None, options: dict[str, Any]) -> Session:
        self.exit_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(log) if log else self.log_dir / f"{session_id}.log"
        log_fd = open_log(log_path, uid, gid, chosen=log is not None)
        wrapper = [sys.executable, "-m", "monitor.wrapper", "--exit-dir", str(self.exit_dir), "--id", session_id]
        if uid != os.geteuid():
            wrapper += ["--user", str(uid), "--group", str(gid)]
        cgroup = cgroups.create(session_id)
        if cgroup is not None:
            wrapper += ["--cgroup", str(cgroup)]
        env = {**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the wrapper is ours, wherever it runs
        try:
            proc = subprocess.Popen([*wrapper, "--", *argv], cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        finally:
            os.close(log_fd)
        self._reap_later(proc)
        key = await self._started(proc, session_id)
        exit_file = self.exit_dir / f"{session_id}.exit"
        if not key.is_alive():  # over already: its wrapper is writing the exit file, if not done
            for _ in range(1000):
                if exit_file.exists():
                    break
                await asyncio.sleep(0.002)
        return await self.engine.register(
            key, cwd=directory, argv=argv, lock=lock, exit_file=str(exit_file), log_file=str(log_path), pgid=proc.pid,
            cgroup=str(cgroup) if cgroup else None, owner_uid=uid, session_id=session_id, **options)

    async def _started(self, proc: subprocess.Popen[bytes], session_id: str) -> ProcessKey:
        """The command's key, from the wrapper's start file."""
        start = self.exit_dir / f"{session_id}.start"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not start.exists():
            if proc.poll() is not None:
                raise LaunchFailed(f"the command did not start (wrapper exit {proc.returncode}; see the log)")
            if loop.time() > deadline:
                raise LaunchFailed(f"the command did not start within {START_TIMEOUT_S:g}s")
            await asyncio.sleep(0.002)
        return ProcessKey.from_dict(json.loads(start.read_text())["key"])

    def _reap_later(self, proc: subprocess.Popen[bytes]) -> None:
        """The wrapper is our child: reap it when it ends (PID 1 may not), without a thread."""
        loop = asyncio.get_running_loop()
        if sys.platform != "linux":  # no pidfds: a thread waits for it
            task = loop.create_task(asyncio.to_thread(proc.wait))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        fd = os.pidfd_open(proc.pid)
        self._wrappers[fd] = proc

        def reap() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._wrappers.pop(fd).wait()

        loop.add_reader(fd, reap)

    async def close(self) -> None:
        """Wrappers outlive a daemon that stops: they and their commands run on."""
        loop = asyncio.get_running_loop()
        for fd in list(self._wrappers):
            loop.remove_reader(fd)
            os.close(fd)
        self._wrappers.clear()
