"""Hooks: shell commands run when a session starts or stops, with its real status.

A session's own (`--on-start`, `--on-complete`) and the config's global ones run as
the session's owner, in its directory, with MONITOR_SESSION_ID, MONITOR_CWD,
MONITOR_EXIT_CODE, MONITOR_SIGNAL, MONITOR_REASON, MONITOR_DURATION_S and each label
as MONITOR_LABEL_<KEY>. Output goes to the session's log (the daemon's log when it
has none); a hook is killed at its timeout; the outcome is returned, never raised,
so a failing hook blocks nothing and the engine records it as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.tracker import Session

log = logging.getLogger(__name__)
HOOK_TIMEOUT_S = 300.0
OUTPUT_LOGGED_BYTES = 64 * 1024  # of a hook with no session log, this much reaches the daemon's log


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command ended: its exit code or the signal that killed it, or why it never ran
    (error), or that it was killed at its timeout."""

    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def kind(self) -> str:
        return "ok" if self.ok else "timeout" if self.timed_out else "error" if self.error else "failed"


def hook_environment(session: Session, *, status: bool = True) -> dict[str, str]:
    """The hook's environment; with `status` False, the exit status, reason and duration are empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    ended = status and session.state == "stopped"
    env.update({
        "MONITOR_SESSION_ID": session.id,
        "MONITOR_CWD": session.cwd,
        "MONITOR_PID": str(session.key.pid),
        "MONITOR_EXIT_CODE": "" if not ended or session.exit_code is None else str(session.exit_code),
        "MONITOR_SIGNAL": "" if not ended or session.signal is None else str(session.signal),
        "MONITOR_REASON": session.reason or "" if ended else "",
        "MONITOR_DURATION_S": "" if not ended or session.duration_s is None else f"{session.duration_s:.3f}",
    })
    for key, value in session.labels.items():
        env["MONITOR_LABEL_" + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()] = value
    return env


async def run_hook(session: Session, hook: str, command: str, timeout_s: float = HOOK_TIMEOUT_S) -> Outcome:
    """Run one of the session's hooks (`hook` names it: on_start, on_complete, config.on_start, ...).

    An on_start hook sees the session as it started, with no status, even when it has ended
    by the time the hook runs (a command over at once, or a hook waiting behind another)."""
    return await run_shell(command, what=f"{hook} hook of session {session.id}", cwd=session.cwd,
                           env=hook_environment(session, status=not hook.endswith("on_start")), uid=session.owner_uid,
                           log_file=session.log_file, timeout_s=timeout_s)


async def run_shell(command: str, *, what: str, cwd: str, uid: int | None, timeout_s: float,
                    env: dict[str, str] | None = None, log_file: str | None = None) -> Outcome:
    """A user's shell command (a hook, a fuse action): as that user when it is not us, in `cwd`,
    in a process group of its own that is killed at `timeout_s`, output appended to `log_file`
    (or logged). Failures are logged and returned, not raised."""
    as_user = uid is not None and uid != os.geteuid()
    if not os.path.isdir(cwd):  # not elsewhere: `rm -rf build` in the daemon's directory would be no better
        log.error("%s could not run: its directory %s is gone", what, cwd)
        return Outcome(error=f"could not run: {cwd} is not a directory")
    output = _open_log(log_file, uid if as_user else None, what) if log_file else None
    gid = None
    if as_user:
        assert uid is not None
        gid, identity = _account(uid)
        env = {**(os.environ if env is None else env), **identity}
    try:
        # The shell enters the directory, as the user: subprocess's own chdir would come before
        # the uid is dropped, through a symlink the user may have swapped in.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", 'cd -- "$1" && eval "$0"', command, cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=output if output is not None else asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, user=uid if as_user else None, group=gid,
            extra_groups=[] if as_user else None)  # not the daemon's supplementary groups (as the wrapper does)
    except OSError as err:
        log.error("%s could not run: %s", what, err)
        return Outcome(error=f"could not run: {err}")
    finally:
        if output is not None:
            os.close(output)
    relay = asyncio.get_running_loop().create_task(_relay(proc.stdout, what)) if proc.stdout is not None else None
    try:
        code = await asyncio.wait_for(proc.wait(), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as err:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(err, asyncio.CancelledError):
            raise
        log.error("%s killed at its %gs timeout", what, timeout_s)
        return Outcome(signal=signal.SIGKILL, error=f"killed at its {timeout_s:g}s timeout", timed_out=True)
    finally:
        if relay is not None:  # EOF, unless something it started in the background holds the pipe
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay, 1.0)
    if code != 0:
        log.warning("%s %s", what, f"killed by signal {-code}" if code < 0 else f"exited with {code}")
    return Outcome(exit_code=code, signal=None) if code >= 0 else Outcome(signal=-code)


async def _relay(stream: asyncio.StreamReader | None, what: str) -> None:
    """Log a hook's output when it has no session log; bounded, but drained to the end."""
    assert stream is not None
    logged = 0
    with contextlib.suppress(ConnectionError, ValueError):
        while line := await stream.readline():
            if logged < OUTPUT_LOGGED_BYTES:
                log.info("%s: %s", what, line.decode(errors="replace").rstrip())
            logged += len(line)


def _open_log(path: str, uid: int | None, what: str) -> int | None:
    """The session's log, opened (by the daemon, maybe root) to append a hook's output: only a
    regular file, not through a symlink at its end, and when the hook runs as another user,
    only a file of that user's. The user may have swapped it since the launch for a link to a
    file of root's, or for a FIFO that would block the daemon's loop in open()."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        log.warning("%s: cannot append to %s (%s); its output goes to this log", what, path, err)
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        os.close(fd)
        log.warning("%s: %s is not a regular file of uid %s any more; its output goes to this log", what, path,
                    uid if uid is not None else os.geteuid())
        return None
    return fd


def _account(uid: int) -> tuple[int, dict[str, str]]:
    """The group and HOME, USER, LOGNAME, SHELL of the user a command runs as, not the daemon's;
    a uid with no passwd entry gets its own number as group and / as home."""
    import pwd

    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return uid, {"HOME": "/", "USER": str(uid), "LOGNAME": str(uid)}
    return entry.pw_gid, {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
                          "SHELL": entry.pw_shell or "/bin/sh"}
