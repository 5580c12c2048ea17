"""The engine: a source's events through the tracker, locks and fuses into the store.

    kernel -> source -> Engine._on_event -> tracker / locks / fuses -> Store (one
    transaction) -> commands (signals, fuse actions, hooks) and listeners (the
    transitions; the committed event records, with their ids)

Thin by design: the decisions are the pure state machines'; the engine feeds them
events and the time, commits what they decide, and only then acts. Every method is
called on the event loop's thread; SQLite runs on one worker thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal as signals
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from monitor import cgroups, members
from monitor.clock import Clock, SystemClock
from monitor.errors import MonitorError
from monitor.events import (
    RELIST,
    Event,
    Exited,
    Forked,
    FuseFired,
    HookFailed,
    LockAcquired,
    LockReleased,
    Overrun,
    SessionStarted,
    SessionStopped,
    Transition,
)
from monitor.fuses import DirFuse, FuseTable
from monitor.hooks import HOOK_TIMEOUT_S, run_hook, run_shell
from monitor.identity import ProcessKey, boot_id
from monitor.locks import Lock, LockTable
from monitor.sources import select_source
from monitor.sources.base import EventSource
from monitor.sources.inotify import ExitFileSource, read_exit_file
from monitor.store import Batch, Record, Store
from monitor.tracker import Orphans, Policy, Session, Signal, SignalOrphans, Step, Tracker, Watch, new_session_id

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RELIST_INTERVAL_S = 30.0
DEFAULT_RETAIN_STOPPED_S = 24 * 3600.0
DEFAULT_RETAIN_EVENTS_S = 7 * 24 * 3600.0
PRUNE_INTERVAL_S = 3600.0
FUSE_ACTION_TIMEOUT_S = 120.0
HOOKS_AT_ONCE = 64  # a burst of stops runs its hooks this many at a time


class Observer(Protocol):
    """What the engine reports as it goes (`monitor.metrics.Metrics` is one)."""

    def exit_to_stop(self, seconds: float) -> None:
        """From a process's exit (the kernel's time, else when it was seen) to its session's
        stop committed and acted on."""

    def hook_run(self, hook: str, outcome: str) -> None:
        """A hook ended: ok, failed, timeout or error."""


class AlreadyDead(MonitorError):
    def __init__(self, key: ProcessKey) -> None:
        super().__init__(f"process {key.pid} has already exited")


def process_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        import psutil

        return str(psutil.Process(pid).cwd())


def process_argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def who_uses(directory: str) -> list[dict[str, Any]]:
    """Every process whose working directory is `directory` or inside it."""
    found = []
    root = os.path.realpath(directory).rstrip(os.sep) + os.sep
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if (cwd.rstrip(os.sep) + os.sep).startswith(root):
            found.append({"pid": int(name), "cwd": cwd, "argv": process_argv(int(name))})
    return found


class Engine:
    """Sessions, locks and directory fuses on verified ground truth, durable in SQLite.

        async with Engine("state.db") as engine:
            session = await engine.attach(pid)
            ...
    """

    def __init__(
        self,
        state_path: str | Path,
        *,
        source: EventSource | str | None = None,
        source_options: dict[str, Any] | None = None,
        exit_dir: str | Path | None = None,
        clock: Clock | None = None,
        alive: Callable[[ProcessKey], bool] | None = None,
        relist_interval_s: float = DEFAULT_RELIST_INTERVAL_S,
        child_grace_s: float = 5.0,
        retain_stopped_s: float = DEFAULT_RETAIN_STOPPED_S,
        retain_events_s: float = DEFAULT_RETAIN_EVENTS_S,
        hooks: dict[str, str] | None = None,
        hook_timeout_s: float = HOOK_TIMEOUT_S,
        observer: Observer | None = None,
        timers: bool = True,
        orphans: Orphans = "keep",
    ) -> None:
        self.state_path = Path(state_path)
        self._source_arg = source
        self._source_options = source_options or {}
        self.exit_dir = Path(exit_dir) if exit_dir else None
        self.clock: Clock = clock or SystemClock()
        self._alive = alive or ProcessKey.is_alive
        self.relist_interval_s = relist_interval_s
        # Stopped sessions stay in memory (and are loaded at start) this long; the store keeps all.
        self.retain_stopped_s = retain_stopped_s
        self.retain_events_s = retain_events_s  # the event log (outbox) is kept this long
        self.hooks = dict(hooks or {})  # on_start / on_complete for every session (the config's)
        self.hook_timeout_s = hook_timeout_s
        self.observer = observer
        self.orphans = orphans  # what a session does with its orphans unless it says (the config's)
        self.tracker = Tracker(child_grace_s=child_grace_s)
        self.locks = LockTable()
        self.boot_id = boot_id()
        self.fuses = FuseTable(self.boot_id)
        self.source: EventSource | None = None
        self._exit_files: ExitFileSource | None = None
        self._store: Store | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-store")
        self._commits: asyncio.Queue[tuple[Batch, Step, asyncio.Future[None] | None] | None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timers = timers
        self._buffer: list[Event] | None = []
        self._listeners: list[Callable[[Transition], None]] = []
        self._record_listeners: list[Callable[[Record], None]] = []
        self._hook_slots: asyncio.Semaphore | None = None
        self._hook_chains: dict[str, asyncio.Task[Any]] = {}  # a session's hooks run one after another
        self._next_prune = 0.0
        self._wake: asyncio.Event | None = None
        self._next_relist = 0.0
        self._actions: set[asyncio.Task[Any]] = set()
        self._dirty_fuses: set[str] = set()  # fuses changed since the last batch
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the source first (buffering its events), load and verify the state, apply
        the buffer, then run. Nothing is fired for a process that lives."""
        loop = self._loop = asyncio.get_running_loop()
        self._commits = asyncio.Queue()
        self._wake = asyncio.Event()
        self._hook_slots = asyncio.Semaphore(HOOKS_AT_ONCE)
        if isinstance(self._source_arg, EventSource):
            self.source = self._source_arg
            await self.source.start()
        else:
            self.source = await select_source(self._source_arg, **{"types": ("fork", "exit"), **self._source_options})
        self.source.set_listener(self._receive)
        if self.exit_dir is not None:
            self.exit_dir.mkdir(parents=True, exist_ok=True)
            self._exit_files = ExitFileSource(self.exit_dir)
            await self._exit_files.start()
            self._exit_files.set_listener(self._receive)
        self._store = await self._run(Store, self.state_path)
        sessions, locks, fuses = await self._run(self._store.load, self.clock.wall() - self.retain_stopped_s)
        await self._reconcile(sessions, locks, fuses)
        buffered, self._buffer = self._buffer or [], None
        for event in buffered:
            self._on_event(event)
        self._tasks.append(loop.create_task(self._commit_loop(), name="monitor-commits"))
        if self._timers:
            self._tasks.append(loop.create_task(self._timer_loop(), name="monitor-timers"))

    async def close(self) -> None:
        """Stop listening and writing. Fires nothing, releases nothing: a restart picks up."""
        if self._commits is not None:  # what was decided is still written: the writer ends after it
            self._commits.put_nowait(None)
        for task in self._tasks:
            if task.get_name() != "monitor-commits":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for task in list(self._actions):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in (self.source, self._exit_files):
            if source is not None:
                await source.close()
        if self._store is not None:
            await self._run(self._store.close)
            self._store = None
        self._writer.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- restart --------------------------------------------------------------------------

    async def _reconcile(self, sessions: list[dict[str, Any]], locks: list[dict[str, Any]], fuses: list[dict[str, Any]]) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        step, batch = Step(), Batch()
        for data in sessions:
            session = Session.from_dict(data)
            self.tracker.load(session)
        for data in locks:
            self.locks.load(Lock.from_dict(data))
        for data in fuses:
            self.fuses.load(DirFuse.from_dict(data), now, wall)
        for session in self.tracker.running():
            tree = session.policy == "tree"
            root_alive = session.root_exit is None and self._alive(session.key)
            if session.key.boot_id != self.boot_id:
                step.extend(self.tracker.stop_unverifiable(session, "reboot", None, wall))
            elif not root_alive and not (tree and self._tree_lives(session)):
                status = self._exit_file_status(session)
                reason = "exited" if status is not None or session.root_exit is not None else "lost"
                step.extend(self.tracker.stop_unverifiable(session, reason, status, wall))
            else:
                if root_alive:
                    self._watch(Watch(session.key, True, existing=tree))
                elif session.root_exit is None:  # a tree's root that ended while we were down
                    ended = self._exit_file_status(session) or Exited.from_wait_status(session.key, None, RELIST)
                    step.extend(self.tracker.on_exited(ended, now, wall))
                for child in list(session.children.values()):
                    if child.state == "running":  # a dead one's Exited is found here, and applied after the load
                        self._watch(Watch(child.key, True, existing=tree))
                step.extend(self._adopt_cgroup(session))
        for session in self.tracker.orphaned():
            for orphan in session.live_orphans():
                self._watch(Watch(ProcessKey.from_dict(orphan["key"]), False))
        for lock in list(self.locks.locks.values()):
            if lock.owner is not None and self.tracker.holds_tree(lock.owner):
                continue  # its session's tree lives on: the lock goes when the tree does
            if lock.owner is not None and (lock.owner.boot_id != self.boot_id or not self._alive(lock.owner)):
                step.transitions += self.locks.release_owner(lock.owner, RELIST)
            elif lock.kind == "auto" and lock.owner is None:  # a launch's reservation, left by a crash
                step.transitions += self.locks.release(lock.directory)
        self._after_stops(step, now, wall)
        self._fill(batch, step)
        if batch:
            await self._run(self._store.commit, batch)  # type: ignore[union-attr]
            self._act(step, batch.outbox)

    def _tree_lives(self, session: Session) -> bool:
        """Some process of a tree session other than its root lives."""
        return bool(members.live_descendants(session, self._alive))

    def _adopt_cgroup(self, session: Session) -> Step:
        """A launched tree session's cgroup members it does not follow yet (forked before it
        was followed, or while we were down): followed from now on."""
        if session.policy != "tree" or session.cgroup is None or session.state != "running":
            return Step()
        step = self.tracker.adopt(session.id, members.cgroup_members(session))
        step.commands += [Watch(key, True, existing=True) for (_sid, key), child in step.children.items() if child is not None]
        return step

    def _owner_alive(self, key: ProcessKey) -> bool:
        """A lock's owner holds it while it lives, or while the tree of its tree session does."""
        return self.tracker.holds_tree(key) or self._alive(key)

    def _exit_file_status(self, session: Session) -> Exited | None:
        if session.exit_file and os.path.exists(session.exit_file):
            try:
                key, status = read_exit_file(Path(session.exit_file))
            except ValueError:
                return None
            if key == session.key:
                return Exited.from_wait_status(key, status, "exit_file")
        return None

    # -- events ---------------------------------------------------------------------------

    def _receive(self, event: Event) -> None:
        if self._buffer is not None:
            self._buffer.append(event)  # still loading: applied once the state is verified
        else:
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        if isinstance(event, Exited):
            step = Step()
            # A launched tree's cgroup may hold members no fork event named (forked before it
            # was followed): taken before its stop is judged.
            member_of = self.tracker.session_of(event.key) or self.tracker.session_rooted_at(event.key)
            if member_of is not None:
                step.extend(self._adopt_cgroup(member_of))
            if not self.tracker.holds_tree(event.key):  # a tree's lock is held until the tree is gone
                # The lock goes first: released the moment its owner's exit is known.
                step.transitions += self.locks.release_owner(event.key, event.source)
            step.extend(self.tracker.on_exited(event, now, wall))
            step.cause_ns = event.kernel_ts_ns or event.observed_ns or None
        elif isinstance(event, Forked):
            step = self.tracker.on_forked(event)
            if step.children:
                self._watch(Watch(event.child, True))
        elif isinstance(event, Overrun):
            self._next_relist = 0.0  # now
            if self._wake is not None:
                self._wake.set()
            return
        else:
            return
        self._after_stops(step, now, wall)
        self._submit(step)

    def _after_stops(self, step: Step, now: float, wall: float) -> None:
        """A stopped session's locks go (if its events have not taken them already), and the
        last session to stop in a directory arms that directory's fuse."""
        for i, transition in enumerate(list(step.transitions)):
            if isinstance(transition, SessionStopped):
                session = self.tracker.sessions[transition.session_id]
                # Its descendants alive now are its orphans: named in its stop, followed until gone.
                orphans = members.live_descendants(session, self._alive)
                step.transitions[i] = dataclasses.replace(transition, orphans=[
                    {"pid": key.pid, "key": key.to_dict(), "argv": argv} for key, argv in orphans])
                step.extend(self.tracker.set_orphans(session.id, orphans, now))  # watched once committed
                step.transitions += self.locks.release_owner(session.key, session.evidence or RELIST)
                if not self.tracker.running_in(session.cwd) and self.fuses.last_session_stopped(session.cwd, now, wall):
                    step.changed_sessions.add(session.id)
                    self._dirty_fuses.add(session.cwd)

    # -- committing -------------------------------------------------------------------------

    def _fill(self, batch: Batch, step: Step) -> None:
        wall = self.clock.wall()
        for sid in step.changed_sessions:
            session = self.tracker.sessions[sid]
            batch.sessions[sid] = (session.state, session.stopped_at, _json(session.to_dict()))
        for (sid, key), child in step.children.items():
            batch.children[(sid, str(key))] = _json(child.to_dict()) if child is not None else None
        for sid in step.child_counts:
            session = self.tracker.sessions[sid]
            batch.child_counts[sid] = (session.children_exited, session.children_unobservable)
        for transition in step.transitions:
            if isinstance(transition, (LockAcquired, LockReleased)):
                lock = self.locks.locks.get(transition.directory)
                batch.locks[transition.directory] = _json(lock.to_dict()) if lock else None
            batch.add_transition(self._payload(transition), transition.subject, wall)
        for directory in self._dirty_fuses:
            fuse = self.fuses.fuses.get(directory)
            batch.fuses[directory] = _json(fuse.to_dict()) if fuse else None
        self._dirty_fuses = set()

    def _payload(self, transition: Transition) -> dict[str, Any]:
        """A transition as its event record says it: with its session's directory, PID and
        labels, so a subscriber or webhook needs nothing else (the session may be long gone)."""
        data = transition.to_dict()
        session = self.tracker.sessions.get(data.get("session_id") or "")
        if session is not None:
            data.setdefault("cwd", session.cwd)
            data.update(pid=session.key.pid, labels=session.labels)
            if isinstance(transition, SessionStopped):
                data.update(argv=session.argv, started_at=session.started_at, stopped_at=session.stopped_at)
        return data

    def _submit(self, step: Step, *, always: bool = False) -> asyncio.Future[None] | None:
        """Queue a step's rows for one transaction; its commands run once it is committed.
        The future is done when they have (None when there was nothing to do)."""
        batch = Batch()
        self._fill(batch, step)
        if not batch and not step.commands and not always:
            return None
        assert self._commits is not None and self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()  # callable outside the loop too (tests)
        self._commits.put_nowait((batch, step, done))
        return done

    async def _commit_loop(self) -> None:
        """One writer. What queued up while it committed goes in the next transaction
        together (group commit): a burst of exits costs a few fsyncs, not one each."""
        assert self._commits is not None and self._store is not None
        while True:
            items = [await self._commits.get()]
            while not self._commits.empty() and len(items) < 1000 and items[-1] is not None:
                items.append(self._commits.get_nowait())
            closing = items[-1] is None
            work = [item for item in items if item is not None]
            merged = Batch()
            for batch, _step, _done in work:
                merged.merge(batch)
            try:
                if merged:
                    await self._run(self._store.commit, merged)
            except Exception as err:
                log.error("could not commit state: %s", err)
                for _batch, _step, done in work:
                    if done is not None and not done.done():
                        done.set_exception(err)
            else:
                for batch, step, done in work:
                    if done is not None and not done.done():
                        done.set_result(None)
                    self._act(step, batch.outbox)
            if closing:
                return  # everything queued before the close was written

    def _act(self, step: Step, records: list[Record]) -> None:
        """After the commit: signals, hooks, fuse actions, then the listeners."""
        for command in step.commands:
            if isinstance(command, Signal):
                self._signal(command)
            elif isinstance(command, Watch):
                self._watch(command)
            elif isinstance(command, SignalOrphans):
                members.signal_orphans(self.tracker.sessions[command.session_id], command.signum)
        for transition in step.transitions:
            if isinstance(transition, SessionStarted):
                self._run_hooks(self.tracker.sessions.get(transition.session_id), "on_start")
            if isinstance(transition, SessionStopped):
                self._session_ended(self.tracker.sessions.get(transition.session_id))
            if isinstance(transition, FuseFired) and transition.action:
                fuse = self.fuses.fuses.get(transition.directory)
                # As whoever set it: a fuse set by a user never runs as the daemon's root.
                self._background(run_shell(transition.action, what=f"fuse action for {transition.directory}",
                                           cwd=transition.directory, uid=fuse.owner_uid if fuse else None,
                                           timeout_s=FUSE_ACTION_TIMEOUT_S))
            for listener in self._listeners:
                try:
                    listener(transition)
                except Exception:
                    log.exception("a transition listener failed")
        for record in records:
            if record.seq is None:
                continue  # refused by the store (a second stop): nothing happened
            for record_listener in self._record_listeners:
                try:
                    record_listener(record)
                except Exception:
                    log.exception("an event listener failed")
        if step.cause_ns is not None and self.observer is not None and any(isinstance(t, SessionStopped) for t in step.transitions):
            self.observer.exit_to_stop((time.monotonic_ns() - step.cause_ns) / 1e9)

    def _signal(self, command: Signal) -> None:
        """Signal the session's process group (it leads one when launched) or the process;
        through a pidfd, so a reused PID can never be hit."""
        key = command.key
        session = self.tracker.session_of(key)
        if session is None:
            session = self.tracker.session_rooted_at(key)
        if session is not None and session.policy == "tree" and session.key == key:
            for child in list(session.children.values()):  # the whole tree, each by its own pidfd
                members.signal_key(child.key, command.signum)
        if session is not None and session.cgroup is not None and session.key == key and self._alive(key):
            if cgroups.signal_all(Path(session.cgroup), command.signum):
                return  # every descendant, wherever it moved its process group
        if session is not None and session.pgid is not None and session.key == key and self._alive(key):
            try:
                if os.getpgid(key.pid) == session.pgid:  # still in the group its launch made
                    os.killpg(session.pgid, command.signum)
                    return
            except OSError:
                pass
        if sys.platform != "linux":  # no pidfds: check the identity, then signal the PID
            if self._alive(key):
                with contextlib.suppress(OSError):
                    os.kill(key.pid, command.signum)
            return
        try:
            fd = os.pidfd_open(key.pid)
        except OSError:
            return  # gone already: its Exited is on its way
        try:
            if ProcessKey.of(key.pid) != key:
                return
            try:
                if os.getpgid(key.pid) == key.pid:
                    os.killpg(key.pid, command.signum)
                    return
            except OSError:
                pass
            signals.pidfd_send_signal(fd, command.signum)
        except (OSError, MonitorError):
            pass
        finally:
            os.close(fd)

    def _session_ended(self, session: Session | None) -> None:
        """After a stop is committed: its cgroup goes, and its on-complete hooks run."""
        if session is None:
            return
        if session.cgroup is not None:
            self._remove_cgroup(Path(session.cgroup), tries=50)
        self._run_hooks(session, "on_complete")

    def _run_hooks(self, session: Session | None, when: str) -> None:
        """The config's hook for `when`, then the session's own, after any still running for it."""
        if session is None:
            return
        commands = [(f"config.{when}", self.hooks.get(when)), (when, getattr(session, when))]
        for hook, command in commands:
            if command:
                previous = self._hook_chains.get(session.id)
                task = self._background(self._hook(session, hook, command, previous))
                self._hook_chains[session.id] = task
                task.add_done_callback(functools.partial(self._hook_done, session.id))

    def _hook_done(self, session_id: str, task: asyncio.Task[Any]) -> None:
        if self._hook_chains.get(session_id) is task:
            del self._hook_chains[session_id]

    async def _hook(self, session: Session, hook: str, command: str, after: asyncio.Task[Any] | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        assert self._hook_slots is not None
        async with self._hook_slots:
            outcome = await run_hook(session, hook, command, self.hook_timeout_s)
        if self.observer is not None:
            self.observer.hook_run(hook, outcome.kind)
        if not outcome.ok:
            self._submit(Step([HookFailed(session.id, hook, outcome.exit_code, outcome.signal, outcome.error)]))

    def _background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Hooks and fuse actions: owned by the engine (cancelled at close), blocking nothing."""
        assert self._loop is not None
        task = self._loop.create_task(work)  # also from outside the loop's callbacks (tests step it by hand)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)
        return task

    def _remove_cgroup(self, path: Path, tries: int) -> None:
        """An emptied cgroup can go; its last processes may take a moment to be reaped."""
        cgroups.remove(path)
        if path.exists() and tries > 0 and self._loop is not None:
            self._loop.call_later(0.1, self._remove_cgroup, path, tries - 1)

    def _watch(self, command: Watch) -> None:
        assert self.source is not None
        try:
            self.source.watch(command.key, descendants=command.descendants, existing=command.existing)
            if self._exit_files is not None:
                self._exit_files.watch(command.key)
        except (MonitorError, OSError) as err:
            log.warning("cannot follow %s: %s", command.key, err)
            self._submit(self.tracker.on_unobservable(command.key, self.clock.monotonic()))

    # -- time -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply everything due now: timeouts, KILLs after a grace, child graces, fuses."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        self.tracker.forget_stopped(before=wall - self.retain_stopped_s)
        if now >= self._next_prune and self._store is not None:
            self._next_prune = now + PRUNE_INTERVAL_S
            self._background(self._prune(wall - self.retain_events_s))
        step = self.tracker.tick(now, wall, self._alive)
        for fired in self.fuses.tick(now):
            step.transitions.append(fired)
            self._dirty_fuses.add(fired.directory)
        self._after_stops(step, now, wall)
        self._submit(step)

    async def _prune(self, before: float) -> None:
        assert self._store is not None
        gone = await self._run(self._store.prune, before)
        if gone:
            log.info("forgot %d events older than %gs", gone, self.retain_events_s)

    def relist(self) -> None:
        """Verify every watched key now: the source reports the dead (positive evidence)."""
        if self.source is not None:
            self.source.resync()

    async def _timer_loop(self) -> None:
        assert self._wake is not None
        self._next_relist = self.clock.monotonic() + self.relist_interval_s
        while True:
            now = self.clock.monotonic()
            if now >= self._next_relist:
                self.relist()
                self._next_relist = now + self.relist_interval_s
            self.tick()
            due = [d for d in (self.tracker.next_deadline(), self.fuses.next_deadline(), self._next_relist) if d is not None]
            delay = max(0.0, min(due) - self.clock.monotonic()) if due else self.relist_interval_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(delay, 1.0))

    # -- the API ----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[Transition], None]) -> None:
        """Called with every transition once it is committed, in order."""
        self._listeners.append(listener)

    def add_record_listener(self, listener: Callable[[Record], None]) -> None:
        """Called with every committed event record (its `seq` set), in order of `seq`;
        after the transition listeners. It must be quick: it runs on the engine's path."""
        self._record_listeners.append(listener)

    async def last_event_id(self) -> int:
        assert self._store is not None
        return await self._run(self._store.last_seq)

    async def records(self, since: int = 0, limit: int = 1000) -> list[Record]:
        """The event log after `since` (an event id), from the store, in order."""
        assert self._store is not None
        return await self._run(self._store.outbox, since, limit)

    async def attach(self, pid: int, **options: Any) -> Session:
        """Follow a running process as a session; its identity is taken now."""
        key = ProcessKey.of(pid)  # NoSuchProcess when there is none
        return await self.register(key, **options)

    async def register(
        self,
        key: ProcessKey,
        *,
        cwd: str | None = None,
        argv: list[str] | None = None,
        labels: dict[str, str] | None = None,
        policy: Policy = "root",
        timeout_s: float | None = None,
        kill_on_timeout: bool = False,
        lock: bool = True,
        force: bool = False,
        exit_file: str | None = None,
        log_file: str | None = None,
        pgid: int | None = None,
        cgroup: str | None = None,
        on_start: str | None = None,
        on_complete: str | None = None,
        owner_uid: int | None = None,
        session_id: str | None = None,
        orphans: Orphans | None = None,
    ) -> Session:
        """Follow a process that a launcher started (or `attach` found) as a new session.

        A process that has already exited is refused, unless `exit_file` is given (a launch):
        then the session is recorded and stopped at once, with the exit file's status.
        """
        ended = not self._alive(key)
        if ended and exit_file is None:
            raise AlreadyDead(key)
        followed = self.tracker.session_of(key)
        if followed is not None:
            raise MonitorError(f"process {key.pid} is already followed by session {followed.id}")
        now, wall = self.clock.monotonic(), self.clock.wall()
        directory = os.path.realpath(cwd or process_cwd(key.pid))
        session = Session(
            id=session_id or new_session_id(), key=key, cwd=directory,
            argv=argv if argv is not None else process_argv(key.pid), labels=dict(labels or {}), policy=policy,
            started_at=wall, started_mono=now, timeout_s=timeout_s,
            deadline=now + timeout_s if timeout_s is not None else None, kill_on_timeout=kill_on_timeout,
            exit_file=exit_file, log_file=log_file, pgid=pgid, cgroup=cgroup, on_start=on_start, on_complete=on_complete,
            owner_uid=owner_uid, orphans_policy=orphans or self.orphans,
        )
        step = Step()
        if lock and not force:
            step.transitions += self.locks.acquire(
                Lock(directory, "auto", key, session.id, locked_at=wall, owner_uid=owner_uid), self._owner_alive)
        step.extend(self.tracker.add(session))
        if self.fuses.session_started(directory):
            self._dirty_fuses.add(directory)
        step.extend(self._adopt_cgroup(session))
        if ended and session.children:  # a tree whose root was over before we could follow it, its members not
            step.commands = [c for c in step.commands if not (isinstance(c, Watch) and c.key == key)]
            status = self._exit_file_status(session)
            step.extend(self.tracker.on_exited(status or Exited.from_wait_status(key, None, RELIST), now, wall))
        elif ended:  # a launch that was over before we could follow it
            status = self._exit_file_status(session)
            step.extend(self.tracker.stop_unverifiable(session, "exited" if status else "lost", status, wall))
            step.commands = []
            self._after_stops(step, now, wall)
        done = self._submit(step)
        for command in step.commands:
            if isinstance(command, Watch):
                self._watch(command)  # after add: an exit found at watch time finds its session
        step.commands = [c for c in step.commands if not isinstance(c, Watch)]
        if done is not None:
            await done
        return session

    async def stop(self, prefix: str, signum: int = signals.SIGTERM, grace_s: float = 5.0) -> Session:
        session = self.tracker.get(prefix)
        done = self._submit(self.tracker.request_stop(session.id, signum, grace_s, self.clock.monotonic()))
        if done is not None:
            await done
        return session

    def session(self, prefix: str) -> Session:
        return self.tracker.get(prefix)

    def sessions(self, *, include_stopped: bool = False) -> list[Session]:
        return [s for s in self.tracker.sessions.values() if include_stopped or s.state == "running"]

    def orphaned(self) -> list[Session]:
        """Stopped sessions whose orphans still live."""
        return self.tracker.orphaned()

    def blocking_children(self, prefix: str) -> list[Any]:
        return self.tracker.blocking_children(self.tracker.get(prefix).id)

    async def lock(self, directory: str, *, by: str | None = None, reason: str | None = None, owner_uid: int | None = None) -> Lock:
        path = os.path.realpath(directory)
        lock = Lock(path, "manual", by=by, reason=reason, locked_at=self.clock.wall(), owner_uid=owner_uid)
        done = self._submit(Step(self.locks.acquire(lock, self._owner_alive)))
        if done is not None:
            await done
        return lock

    async def reserve_lock(self, directory: str, session_id: str, owner_uid: int | None = None) -> Lock:
        """Take a directory's lock for a session about to be launched: atomically, before the
        spawn, so two launches cannot both start there. `register` then hands it to the process."""
        path = os.path.realpath(directory)
        lock = Lock(path, "auto", None, session_id, locked_at=self.clock.wall(), owner_uid=owner_uid)
        done = self._submit(Step(self.locks.acquire(lock, self._owner_alive)))
        if done is not None:
            await done
        return lock

    async def unlock(self, directory: str) -> None:
        done = self._submit(Step(self.locks.release(os.path.realpath(directory))))
        if done is not None:
            await done

    async def who_uses(self, directory: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(who_uses, directory)

    async def fuse_set(self, directory: str, ttl_s: float, action: str | None = None, owner_uid: int | None = None) -> DirFuse:
        path = os.path.realpath(directory)
        fuse = self.fuses.set(path, ttl_s, action, busy=bool(self.tracker.running_in(path)),
                              now=self.clock.monotonic(), wall=self.clock.wall(), owner_uid=owner_uid)
        await self._save_fuse(path)
        return fuse

    async def fuse_extend(self, directory: str, by_s: float) -> DirFuse:
        path = os.path.realpath(directory)
        fuse = self.fuses.extend(path, by_s, self.clock.monotonic())
        await self._save_fuse(path)
        return fuse

    async def fuse_cancel(self, directory: str) -> DirFuse:
        path = os.path.realpath(directory)
        fuse = self.fuses.cancel(path)
        await self._save_fuse(path)
        return fuse

    async def _save_fuse(self, path: str) -> None:
        self._dirty_fuses.add(path)
        done = self._submit(Step())
        if done is not None:
            await done
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until everything decided so far is committed and acted on."""
        done = self._submit(Step(), always=True)
        assert done is not None
        await done


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))
