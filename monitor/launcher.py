"""Launching a session, write-ahead: nothing runs that is not first stored.

    reserve the lock (stored) -> ID.launch (fsync'd) -> wrapper forks the command,
    which waits -> its key -> register the session (stored) -> go -> exec

The reservation and the launch record are durable before anything is spawned; the
command's process exists (so its key and cgroup are known) but execs only on the
daemon's go, which comes after the session is stored. So a daemon killed at any point
leaves no command running untracked: before the go, the command never runs (its go
pipe reaches EOF) and the restart releases the reservation; after it, the restart
finds the stored session. The wrapper keeps the daemon's uid, so that only it writes
the exit file (which survives a daemon that was down), and runs the command as the
user who asked, in the session's cgroup and a process group of its own. Output goes
to a log file that belongs to that user.
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
from monitor.errors import AccessDenied, MonitorError, StorageError
from monitor.identity import ProcessKey
from monitor.tracker import Session, new_session_id
from monitor.wrapper import remove_launch_files, write_atomically

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
        self._wrappers: dict[int, tuple[subprocess.Popen[bytes], str]] = {}  # reaped when their pidfd is readable
        self._waiting: set[asyncio.Task[int]] = set()
        self._cut_short: set[str] = set()  # launches that failed before their go: cleaned up when their wrapper ends

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
        self.exit_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(log) if log else self.log_dir / f"{session_id}.log"
        log_fd = open_log(log_path, uid, gid, chosen=log is not None)
        try:
            if locked:
                await self.engine.reserve_lock(directory, session_id, uid)
            try:
                return await self._start(argv, directory, env, uid, gid, locked, session_id, log_fd, log_path, options)
            except BaseException:
                if locked:
                    self.engine.cancel_reservation(directory, session_id)  # nothing ran: retried until stored
                raise
        finally:
            os.close(log_fd)

    async def _start(self, argv: list[str], directory: str, env: dict[str, str], uid: int, gid: int, lock: bool,
                     session_id: str, log_fd: int, log_path: Path, options: dict[str, Any]) -> Session:
        exit_file = self.exit_dir / f"{session_id}.exit"
        cgroup = cgroups.create(session_id)
        registration = {"cwd": directory, "argv": argv, "lock": lock, "exit_file": str(exit_file), "log_file": str(log_path),
                        "cgroup": str(cgroup) if cgroup else None, "owner_uid": uid, "session_id": session_id, **options}
        try:
            await asyncio.to_thread(write_atomically, self.exit_dir / f"{session_id}.launch", registration)
        except OSError as err:
            self._forget(session_id, cgroup)
            raise StorageError.of(err) from err
        wrapper = [sys.executable, "-m", "monitor.wrapper", "--exit-dir", str(self.exit_dir), "--id", session_id]
        if uid != os.geteuid():
            wrapper += ["--user", str(uid), "--group", str(gid)]
        if cgroup is not None:
            wrapper += ["--cgroup", str(cgroup)]
        env = {**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the wrapper is ours, wherever it runs
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            try:
                proc = subprocess.Popen([*wrapper, "--go-fd", str(go_r), "--ready-fd", str(ready_w), "--", *argv],
                                        cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True, pass_fds=(go_r, ready_w))
            finally:
                os.close(go_r)
                os.close(ready_w)
            self._reap_later(proc, session_id)
            try:
                key = await self._ready(proc, ready_r)
                session = await self.engine.register(key, pgid=key.pid, **registration)
            except BaseException:
                self._cut_short.add(session_id)  # its command will never run: the wrapper's files go when it ends
                raise
            os.write(go_w, b"g")  # stored: now it may run
            return session
        finally:
            os.close(go_w)  # without a go, the command's process sees EOF and never runs
            os.close(ready_r)

    async def _ready(self, proc: subprocess.Popen[bytes], ready_r: int) -> ProcessKey:
        """The command's key, from the wrapper's ready pipe, once its process is forked."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()
        data = bytearray()

        def readable() -> None:
            try:
                chunk = os.read(ready_r, 4096)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            data.extend(chunk)
            if (not chunk or b"\n" in data) and not got.done():
                got.set_result(bytes(data))

        os.set_blocking(ready_r, False)
        loop.add_reader(ready_r, readable)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await got
        except TimeoutError:
            raise LaunchFailed(f"the command did not start within {START_TIMEOUT_S:g}s") from None
        finally:
            loop.remove_reader(ready_r)
        try:
            key = json.loads(line)["key"]
        except (ValueError, KeyError, TypeError):
            key = None
        if key is None:
            status = await asyncio.to_thread(proc.wait, 5.0)
            raise LaunchFailed(f"the command did not start (wrapper exit {status}; see the log)")
        return ProcessKey.from_dict(key)

    def _reap_later(self, proc: subprocess.Popen[bytes], session_id: str) -> None:
        """The wrapper is our child: reap it when it ends (PID 1 may not), without a thread."""
        loop = asyncio.get_running_loop()
        if sys.platform != "linux":  # no pidfds: a thread waits for it
            task = loop.create_task(asyncio.to_thread(proc.wait))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        fd = os.pidfd_open(proc.pid)
        self._wrappers[fd] = (proc, session_id)

        def reap() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            proc, session_id = self._wrappers.pop(fd)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0)
            if session_id in self._cut_short:
                self._cut_short.discard(session_id)
                self._forget(session_id, cgroups.path_of(session_id))

        loop.add_reader(fd, reap)

    def _forget(self, session_id: str, cgroup: Path | None) -> None:
        """A launch cut short before its go: its files and its cgroup go (nothing ran there)."""
        remove_launch_files(self.exit_dir, session_id)
        if cgroup is not None:
            cgroups.remove(cgroup)

    async def close(self) -> None:
        """Wrappers outlive a daemon that stops: they and their commands run on."""
        loop = asyncio.get_running_loop()
        for fd in list(self._wrappers):
            loop.remove_reader(fd)
            os.close(fd)
        self._wrappers.clear()
