"""Hooks: a session's --on-complete command, run once it has stopped, with its real status.

Run as the session's owner, in its directory, with MONITOR_SESSION_ID, MONITOR_CWD,
MONITOR_EXIT_CODE, MONITOR_SIGNAL, MONITOR_REASON, MONITOR_DURATION_S and each label
as MONITOR_LABEL_<KEY>; its output goes to the session's log; it is killed at its
timeout; a failure is logged and blocks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.tracker import Session

log = logging.getLogger(__name__)
HOOK_TIMEOUT_S = 300.0


def hook_environment(session: Session) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    env.update({
        "MONITOR_SESSION_ID": session.id,
        "MONITOR_CWD": session.cwd,
        "MONITOR_EXIT_CODE": "" if session.exit_code is None else str(session.exit_code),
        "MONITOR_SIGNAL": "" if session.signal is None else str(session.signal),
        "MONITOR_REASON": session.reason or "",
        "MONITOR_DURATION_S": f"{session.duration_s or 0.0:.3f}",
    })
    for key, value in session.labels.items():
        env["MONITOR_LABEL_" + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()] = value
    return env


async def run_hook(session: Session, timeout_s: float = HOOK_TIMEOUT_S) -> int | None:
    """Run the session's on-complete hook; its exit status, or None if it could not run or timed out."""
    assert session.on_complete
    return await run_shell(session.on_complete, what=f"on-complete hook of session {session.id}", cwd=session.cwd,
                           env=hook_environment(session), uid=session.owner_uid, log_file=session.log_file,
                           timeout_s=timeout_s)


async def run_shell(command: str, *, what: str, cwd: str, uid: int | None, timeout_s: float,
                    env: dict[str, str] | None = None, log_file: str | None = None) -> int | None:
    """A user's shell command (a hook, a fuse action): as that user when it is not us, in `cwd`,
    in a process group of its own that is killed at `timeout_s`, output appended to `log_file`.
    Its exit status, or None when it could not run or timed out; failures are logged, not raised."""
    as_user = uid is not None and uid != os.geteuid()
    output = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC) if log_file else None
    try:
        proc = await asyncio.create_subprocess_shell(
            command, cwd=cwd if os.path.isdir(cwd) else None, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=output if output is not None else asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, user=uid if as_user else None, group=_gid(uid) if as_user else None)
    except OSError as err:
        log.error("%s could not run: %s", what, err)
        return None
    finally:
        if output is not None:
            os.close(output)
    try:
        code = await asyncio.wait_for(proc.wait(), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as err:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(err, asyncio.CancelledError):
            raise
        log.error("%s killed at its %gs timeout", what, timeout_s)
        return None
    if code != 0:
        log.warning("%s exited with %s", what, code)
    return code


def _gid(uid: int | None) -> int | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid if uid is not None else None
    except KeyError:
        return uid
