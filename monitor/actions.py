"""Acting on committed steps: signals, hooks, fuse actions, cgroups, launch files, listeners.

Runs only after a step is stored, in commit order. Every effect is guarded on its own:
a signal the kernel refuses, a hook that cannot start, a listener that raises, is a
log line (and, for hooks and fuse actions, a `hook.failed` or `fuse.action_failed`
event), never the end of the commit loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal as signals
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor import cgroups, members
from monitor.errors import MonitorError
from monitor.events import FuseActionFailed, FuseFired, HookFailed, SessionStarted, SessionStopped, Transition
from monitor.hooks import run_hook, run_shell
from monitor.identity import ProcessKey
from monitor.store import Record
from monitor.tasks import cancel
from monitor.tracker import Session, Signal, SignalOrphans, Step, Watch
from monitor.wrapper import remove_launch_files

if TYPE_CHECKING:
    from monitor.committer import Work
    from monitor.engine import Engine

log = logging.getLogger(__name__)

FUSE_ACTION_TIMEOUT_S = 120.0
HOOKS_AT_ONCE = 64  # a burst of stops runs its hooks this many at a time


class Actions:
    """What happens once a step is stored. Owns the tasks it starts (cancelled at close)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.get_running_loop()  # made by the engine's start; also used from outside the loop (tests)
        self.listeners: list[Callable[[Transition], None]] = []
        self.record_listeners: list[Callable[[Record], None]] = []
        self._hook_slots = asyncio.Semaphore(HOOKS_AT_ONCE)
        self._hook_chains: dict[str, asyncio.Task[Any]] = {}  # a session's hooks run one after another
        self._tasks: set[asyncio.Task[Any]] = set()
        self.cgroups = cgroups.CgroupReaper()  # a stopped session's cgroup goes when the kernel says it is empty

    def act(self, work: Work) -> None:
        """A stored step's effects: its commands first (a stop's signal waits for nothing),
        then its events to whoever reads them (subscribers, webhooks, the fleet: the
        consumer before the housekeeping), then what its transitions set off."""
        step = work.step
        for command in step.commands:
            if isinstance(command, Signal):
                self._guarded("signalling", self.signal, command)
            elif isinstance(command, Watch):  # a member found by the kernel, an orphan
                self._guarded("following a process", self.engine.watch, command)
            elif isinstance(command, SignalOrphans):
                self._guarded("signalling orphans", members.signal_orphans, self.engine.tracker.sessions[command.session_id],
                              command.signum)
        for record in work.records:
            if record.seq is None:
                continue  # refused by the store (a second stop): nothing happened
            for record_listener in self.record_listeners:
                self._guarded("an event listener", record_listener, record)
        for transition in step.transitions:
            if isinstance(transition, SessionStarted):
                self._guarded("running on-start hooks", self.run_hooks, self.engine.tracker.sessions.get(transition.session_id),
                              "on_start")
            elif isinstance(transition, SessionStopped):
                self._guarded("ending a session", self.session_ended, self.engine.tracker.sessions.get(transition.session_id))
            elif isinstance(transition, FuseFired) and transition.action:
                self._guarded("running a fuse action", self.fuse_action, transition)
            for listener in self.listeners:
                self._guarded("a transition listener", listener, transition)
        observer = self.engine.observer
        if step.cause_ns is not None and observer is not None and any(isinstance(t, SessionStopped) for t in step.transitions):
            observer.exit_to_stop((time.monotonic_ns() - step.cause_ns) / 1e9)

    @staticmethod
    def _guarded(what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s failed; going on", what)

    # -- signals ----------------------------------------------------------------------------

    def signal(self, command: Signal) -> None:
        """Signal the session's cgroup, its process group (a launched command leads one), or
        the process; through a pidfd, so a reused PID can never be hit."""
        key, alive = command.key, self.engine.alive
        session = self.engine.tracker.session_of(key) or self.engine.tracker.session_rooted_at(key)
        if session is not None and session.policy == "tree" and session.key == key:
            for child in list(session.children.values()):  # the whole tree, each by its own pidfd
                members.signal_key(child.key, command.signum, session.owner_uid)
        if session is not None and session.cgroup is not None and session.key == key and alive(key):
            if cgroups.signal_all(Path(session.cgroup), command.signum):
                return  # every descendant, wherever it moved its process group
        if session is not None and session.pgid is not None and session.key == key and alive(key):
            try:
                if os.getpgid(key.pid) == session.pgid:  # still in the group its launch made
                    os.killpg(session.pgid, command.signum)
                    return
            except OSError:
                pass
        if sys.platform != "linux":  # no pidfds: check the identity, then signal the PID
            if alive(key):
                with contextlib.suppress(OSError):
                    os.kill(key.pid, command.signum)
            return
        send_through_pidfd(key, command.signum)

    # -- a session's end --------------------------------------------------------------------

    def session_ended(self, session: Session | None) -> None:
        """After a stop is stored: its cgroup goes, its launch files go, its on-complete hooks run."""
        if session is None:
            return
        if session.cgroup is not None:
            self.cgroups.remove_when_empty(Path(session.cgroup))
        self.forget_launch_files(session.id)
        self.run_hooks(session, "on_complete")

    def forget_launch_files(self, session_id: str) -> None:
        """A launch's files are evidence only until its stop is stored (then the store has it)."""
        if self.engine.exit_dir is not None:
            remove_launch_files(self.engine.exit_dir, session_id)

    # -- hooks and fuse actions -------------------------------------------------------------

    def run_hooks(self, session: Session | None, when: str) -> None:
        """The config's hook for `when`, then the session's own, after any still running for it."""
        if session is None:
            return
        commands = [(f"config.{when}", self.engine.hooks.get(when)), (when, getattr(session, when))]
        for hook, command in commands:
            if command:
                previous = self._hook_chains.get(session.id)
                task = self.background(self._hook(session, hook, command, previous))
                self._hook_chains[session.id] = task
                task.add_done_callback(functools.partial(self._hook_done, session.id))

    def _hook_done(self, session_id: str, task: asyncio.Task[Any]) -> None:
        if self._hook_chains.get(session_id) is task:
            del self._hook_chains[session_id]

    async def _hook(self, session: Session, hook: str, command: str, after: asyncio.Task[Any] | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        async with self._hook_slots:
            outcome = await run_hook(session, hook, command, self.engine.hook_timeout_s)
        if self.engine.observer is not None:
            self.engine.observer.hook_run(hook, outcome.kind)
        if not outcome.ok:
            self.engine.submit(Step([HookFailed(session.id, hook, outcome.exit_code, outcome.signal, outcome.error)]))

    def fuse_action(self, fired: FuseFired) -> None:
        assert fired.action is not None
        fuse = self.engine.fuses.fuses.get(fired.directory)
        # As whoever set it: a fuse set by a user never runs as the daemon's root.
        self.background(self._fuse_action(fired, fired.action, fuse.owner_uid if fuse else None))

    async def _fuse_action(self, fired: FuseFired, action: str, uid: int | None) -> None:
        outcome = await run_shell(action, what=f"fuse action for {fired.directory}", cwd=fired.directory, uid=uid,
                                  timeout_s=FUSE_ACTION_TIMEOUT_S)
        if not outcome.ok:  # an event, as a failed hook is: a log line alone is seen by nobody
            self.engine.submit(Step([FuseActionFailed(fired.directory, action, fired.armed_at, outcome.exit_code, outcome.signal,
                                                      outcome.error, outcome.timed_out)]))

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Hooks, fuse actions, pruning: owned here (cancelled at close), blocking nothing."""
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %r", task.exception(), exc_info=task.exception())

    async def close(self) -> None:
        self.cgroups.close()
        for task in list(self._tasks):
            await cancel(task)


def send_through_pidfd(key: ProcessKey, signum: int) -> None:
    """Signal the process `key` names (its group, when it leads one), never a reused PID."""
    if sys.platform != "linux":
        raise MonitorError("pidfds are Linux's")
    try:
        fd = os.pidfd_open(key.pid)
    except OSError:
        return  # gone already: its Exited is on its way
    try:
        if ProcessKey.of(key.pid) != key:
            return
        try:
            if os.getpgid(key.pid) == key.pid:
                os.killpg(key.pid, signum)
                return
        except OSError:
            pass
        signals.pidfd_send_signal(fd, signum)
    except (OSError, MonitorError):
        pass
    finally:
        os.close(fd)
