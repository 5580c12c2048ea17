"""The engine: a source's events through the tracker, locks and fuses into the store.

    kernel -> source -> Engine._on_event -> tracker / locks / fuses -> Committer
    (one transaction) -> Actions (signals, hooks, fuse actions, listeners)

Thin by design: the decisions are the pure state machines'; the engine feeds them
events and the time, hands what they decide to the committer, and acts only once it
is stored. Its rooms: `committer.py` (the invariant: memory is what a restart would
load, plus what is queued; a client's change that cannot be stored is undone),
`actions.py` (every side effect, guarded), `reconcile.py` (restart). Every method is
called on the event loop's thread; SQLite runs on one worker thread of its own.

If the commit or timer loop dies anyway, `failed` says why: the daemon exits non-zero
at once rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal as signals
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from monitor import members, reconcile
from monitor.actions import Actions
from monitor.clock import Clock, SystemClock
from monitor.committer import Committer, Rows, Work
from monitor.errors import AccessDenied, MonitorError, NoSuchProcess
from monitor.events import RELIST, Event, Exited, Forked, Overrun, SessionStopped, StateRecovered, Transition
from monitor.fuses import DirFuse, FuseTable
from monitor.hooks import HOOK_TIMEOUT_S
from monitor.identity import ProcessKey, boot_id
from monitor.locks import Lock, LockTable
from monitor.sources import select_source
from monitor.sources.base import EventSource
from monitor.sources.inotify import ExitFileSource
from monitor.store import Batch, Record, Recovery, Store
from monitor.tracker import Orphans, Policy, Session, Step, Tracker, Watch, new_session_id

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RELIST_INTERVAL_S = 30.0
DEFAULT_RETAIN_STOPPED_S = 24 * 3600.0
DEFAULT_RETAIN_EVENTS_S = 7 * 24 * 3600.0
PRUNE_INTERVAL_S = 3600.0


class Observer(Protocol):
    """What the engine reports as it goes (`monitor.metrics.Metrics` is one)."""

    def exit_to_stop(self, seconds: float) -> None:
        """From a process's exit (the kernel's time, else when it was seen) to its session's
        stop committed and acted on."""

    def hook_run(self, hook: str, outcome: str) -> None:
        """A hook ended: ok, failed, timeout or error."""

    def exit_applied(self, event: Exited, released: int) -> None:
        """The engine's memory took in a process's exit: the `released` locks it owned are
        free to anyone asking from now on (their release is committed after)."""


class AlreadyDead(MonitorError):
    def __init__(self, key: ProcessKey) -> None:
        super().__init__(f"process {key.pid} has already exited")


class AlreadyFollowed(MonitorError):
    """The process is a running session's already: a conflict, not a bad request."""


def process_cwd(pid: int) -> str:
    """Its working directory; NoSuchProcess once it has exited (a zombie has none left)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        import psutil

        try:
            return str(psutil.Process(pid).cwd())
        except psutil.NoSuchProcess as err:  # ZombieProcess too: it exited while we looked
            raise NoSuchProcess(pid, f"process {pid} has exited") from err
        except psutil.AccessDenied as err:
            raise AccessDenied(f"cannot read the working directory of process {pid}") from err


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
        self.alive = alive or ProcessKey.is_alive
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
        self.committer: Committer | None = None
        self.actions: Actions | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._timers = timers
        self._buffer: list[Event] | None = []
        self._pending_listeners: tuple[list[Callable[[Transition], None]], list[Callable[[Record], None]]] = ([], [])
        self._next_prune = 0.0
        self._wake: asyncio.Event | None = None
        self._next_relist = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: asyncio.Future[BaseException] | None = None  # done when a core task died
        self.recovered_launches: list[str] = []

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
        self._wake = asyncio.Event()
        self.failed = loop.create_future()
        self.actions = Actions(self)
        self.actions.listeners += self._pending_listeners[0]
        self.actions.record_listeners += self._pending_listeners[1]
        self.committer = Committer(self._write, self._serialize, self.actions.act)
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
        step = reconcile.load(self, sessions, locks, fuses)
        self._supervise(loop.create_task(self.committer.run(), name="monitor-commits"))
        self._after_stops(step, self.clock.monotonic(), self.clock.wall())
        restarted = self.submit(step)
        if restarted is not None:
            await restarted
        self.recovered_launches = await reconcile.recover_launches(self, rebuilt=self._store.recovered is not None)
        if self._store.recovered is not None:
            await self._recovered(self._store.recovered)
        self.actions.cgroups.sweep({s.cgroup for s in self.tracker.running() if s.cgroup})  # leftovers of stopped sessions
        buffered, self._buffer = self._buffer or [], None
        for event in buffered:
            self._on_event(event)
        if self._timers:
            self._supervise(loop.create_task(self._timer_loop(), name="monitor-timers"))

    async def _recovered(self, recovery: Recovery) -> None:
        """Say once, loudly, that the state file was unusable, and tell subscribers."""
        log.error("state file %s was unusable (%s): moved aside to %s (with its -wal and -shm); started on a fresh store, "
                  "%d launched sessions recovered from their files%s", recovery.path, recovery.reason, recovery.moved_to,
                  len(self.recovered_launches), f" ({', '.join(self.recovered_launches)})" if self.recovered_launches else "")
        done = self.submit(Step([StateRecovered(str(recovery.path), str(recovery.moved_to), recovery.reason,
                                                tuple(self.recovered_launches))]))
        if done is not None:
            await done

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """A core task that ends by an exception is the engine's end: `failed` says why."""
        self._tasks.append(task)

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or self.failed is None or self.failed.done():
                return
            err = task.exception()
            if err is None and task.get_name() == "monitor-commits" and self._closing:
                return
            err = err or RuntimeError(f"{task.get_name()} ended")
            log.critical("%s died: %r; the engine cannot go on", task.get_name(), err, exc_info=err)
            self.failed.set_result(err)

        task.add_done_callback(ended)

    async def close(self) -> None:
        """Stop listening and writing. Fires nothing, releases nothing: a restart picks up."""
        self._closing = True
        if self.committer is not None:  # what was decided is still written: the writer ends after it
            self.committer.close()
        for task in self._tasks:
            if task.get_name() != "monitor-commits":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # a task that died has said why (`failed`)
        self._tasks.clear()
        if self.actions is not None:
            await self.actions.close()
        for source in (self.source, self._exit_files):
            if source is not None:
                await source.close()
        if self._store is not None:
            await self._run(self._store.close)
            self._store = None
        self._writer.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- events ---------------------------------------------------------------------------

    def _receive(self, event: Event) -> None:
        if self._buffer is not None:
            self._buffer.append(event)  # still loading: applied once the state is verified
            return
        try:
            self._on_event(event)
        except Exception:  # a bug here must not stop the source's reading: the relist finds what it missed
            log.exception("applying %s failed", event)
            self._next_relist = 0.0

    def _on_event(self, event: Event) -> None:
        now, wall = self.clock.monotonic(), self.clock.wall()
        if isinstance(event, Exited):
            step = Step()
            # A launched tree's cgroup may hold members no fork event named (forked before it
            # was followed): taken before its stop is judged (its root's exit, or its last
            # tracked member's after the root's).
            member_of = self.tracker.session_of(event.key) or self.tracker.session_rooted_at(event.key)
            if member_of is not None and (event.key == member_of.key or (
                    member_of.root_exit is not None and len(member_of.children) <= 1)):
                step.extend(self.adopt_cgroup(member_of))
            released: list[Transition] = []
            if not self.tracker.holds_tree(event.key):  # a tree's lock is held until the tree is gone
                # The lock goes first: released the moment its owner's exit is known.
                released = self.locks.release_owner(event.key, event.source)
                step.transitions += released
            if self.observer is not None:
                self.observer.exit_applied(event, len(released))
            step.extend(self.tracker.on_exited(event, now, wall))
            step.cause_ns = event.kernel_ts_ns or event.observed_ns or None
        elif isinstance(event, Forked):
            step = self.tracker.on_forked(event)
            if step.children:
                self.watch(Watch(event.child, True))
        elif isinstance(event, Overrun):
            self._next_relist = 0.0  # now
            if self._wake is not None:
                self._wake.set()
            return
        else:
            return
        self._after_stops(step, now, wall)
        self.submit(step)

    def _after_stops(self, step: Step, now: float, wall: float) -> None:
        """A stopped session's locks go (if its events have not taken them already), and the
        last session to stop in a directory arms that directory's fuse."""
        for i, transition in enumerate(list(step.transitions)):
            if isinstance(transition, SessionStopped):
                session = self.tracker.sessions[transition.session_id]
                # Its descendants alive now are its orphans: named in its stop, followed until gone.
                orphans = members.live_descendants(session, self.alive)
                step.transitions[i] = dataclasses.replace(transition, orphans=[
                    {"pid": key.pid, "key": key.to_dict(), "argv": argv} for key, argv in orphans])
                step.extend(self.tracker.set_orphans(session.id, orphans, now))  # watched once stored
                step.transitions += self.locks.release_owner(session.key, session.evidence or RELIST)
                if not self.tracker.running_in(session.cwd):
                    self.fuses.last_session_stopped(session.cwd, now, wall)

    # -- committing -------------------------------------------------------------------------

    def submit(self, step: Step, *, undo: Callable[[], None] | None = None, always: bool = False) -> asyncio.Future[None] | None:
        """Queue a step for one transaction: the rows its state machines changed and its
        event records; its commands run once it is stored. `undo` (a client's request)
        takes it back if the store refuses it. The future is done when it has been stored
        and acted on (None when there was nothing to do)."""
        rows = self._changed_rows(step)
        wall = self.clock.wall()
        batch = Batch()
        records = [batch.add_transition(self._payload(t), t.subject, wall) for t in step.transitions]
        if not rows and not records and not step.commands and not always:
            return None
        assert self.committer is not None and self._loop is not None
        self.committer.pending.merge(rows)
        done: asyncio.Future[None] = self._loop.create_future()  # callable outside the loop too (tests)
        self.committer.submit(Work(step, records, done, undo))
        return done

    def _changed_rows(self, step: Step) -> Rows:
        """Every row a state machine changed since the last step (they report each one)."""
        return Rows(set(step.changed_sessions), self.locks.take_changed(), self.fuses.take_changed(),
                    set(step.children), set(step.child_counts))

    def _serialize(self, rows: Rows) -> Batch:
        """The named rows, as they are in memory now (a row gone from memory is deleted)."""
        batch = Batch()
        for sid in rows.sessions:
            session = self.tracker.sessions.get(sid)
            if session is not None:
                batch.sessions[sid] = (session.state, session.stopped_at, _json(session.to_dict()))
        for directory in rows.locks:
            lock = self.locks.locks.get(directory)
            batch.locks[directory] = _json(lock.to_dict()) if lock else None
        for directory in rows.fuses:
            fuse = self.fuses.fuses.get(directory)
            batch.fuses[directory] = _json(fuse.to_dict()) if fuse else None
        for sid, key in rows.children:  # one row per child changed: a fork or an exit costs the same at any count
            session = self.tracker.sessions.get(sid)
            child = session.child(key) if session is not None else None
            batch.children[(sid, str(key))] = _json(child.to_dict()) if child is not None else None
        for sid in rows.child_counts:
            session = self.tracker.sessions.get(sid)
            if session is not None:
                batch.child_counts[sid] = (session.children_exited, session.children_unobservable)
        return batch

    async def _write(self, batch: Batch) -> None:
        assert self._store is not None
        await self._run(self._store.commit, batch)

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

    async def _request(self, step: Step, undo: Callable[[], None]) -> None:
        """A client's change: stored, or undone and refused (StorageError)."""
        done = self.submit(step, undo=self._undoing(undo))
        if done is not None:
            await done

    def _undoing(self, undo: Callable[[], None]) -> Callable[[], None]:
        def take_back() -> None:
            undo()
            assert self.committer is not None
            self.committer.pending.merge(self._changed_rows(Step()))  # its rows are the store's again

        return take_back

    def watch(self, command: Watch) -> None:
        assert self.source is not None
        try:
            self.source.watch(command.key, descendants=command.descendants, existing=command.existing)
            if self._exit_files is not None:
                self._exit_files.watch(command.key)
        except (MonitorError, OSError) as err:
            log.warning("cannot follow %s: %s", command.key, err)
            self.submit(self.tracker.on_unobservable(command.key, self.clock.monotonic()))

    def owner_alive(self, key: ProcessKey) -> bool:
        """A lock's owner holds it while it lives, or while the tree of its tree session does."""
        return self.tracker.holds_tree(key) or self.alive(key)

    def adopt_cgroup(self, session: Session) -> Step:
        """A launched tree session's cgroup members it does not follow yet (forked before it
        was followed, or while we were down): followed from now on (watched once stored)."""
        if session.policy != "tree" or session.cgroup is None or session.state != "running":
            return Step()
        step = self.tracker.adopt(session.id, members.cgroup_members(session))
        step.commands += [Watch(key, True, existing=True) for (_sid, key), child in step.children.items() if child is not None]
        return step

    def _unwatch(self, key: ProcessKey) -> None:
        for source in (self.source, self._exit_files):
            if source is not None:
                with contextlib.suppress(MonitorError, OSError, KeyError):
                    source.unwatch(key)

    # -- time -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply everything due now: timeouts, KILLs after a grace, child graces, fuses."""
        now, wall = self.clock.monotonic(), self.clock.wall()
        self.tracker.forget_stopped(before=wall - self.retain_stopped_s)
        if now >= self._next_prune and self._store is not None:
            self._next_prune = now + PRUNE_INTERVAL_S
            assert self.actions is not None
            self.actions.background(self._prune(wall - self.retain_events_s))
        step = self.tracker.tick(now, wall, self.alive)
        step.transitions += self.fuses.tick(now)
        self._after_stops(step, now, wall)
        self.submit(step)

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
            try:
                if now >= self._next_relist:
                    self._next_relist = now + self.relist_interval_s
                    self.relist()
                self.tick()
            except Exception:
                log.exception("a timer step failed; going on")
            due = [d for d in (self.tracker.next_deadline(), self.fuses.next_deadline(), self._next_relist) if d is not None]
            delay = max(0.0, min(due) - self.clock.monotonic()) if due else self.relist_interval_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(delay, 1.0))

    # -- the API ----------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[Transition], None]) -> None:
        """Called with every transition once it is committed, in order."""
        (self.actions.listeners if self.actions is not None else self._pending_listeners[0]).append(listener)

    def add_record_listener(self, listener: Callable[[Record], None]) -> None:
        """Called with every committed event record (its `seq` set), in order of `seq`;
        after the transition listeners. It must be quick: it runs on the engine's path."""
        (self.actions.record_listeners if self.actions is not None else self._pending_listeners[1]).append(listener)

    @property
    def store_failure(self) -> str | None:
        """What the store last refused, while it goes on refusing (None: it works)."""
        failure = self.committer.failure if self.committer is not None else None
        return str(failure) if failure is not None else None

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
        Stored before it returns; when the store refuses it, nothing of it stays.
        """
        ended = not self.alive(key)
        if ended and exit_file is None:
            raise AlreadyDead(key)
        followed = self.tracker.session_of(key)
        if followed is not None:
            raise AlreadyFollowed(f"process {key.pid} is already followed by session {followed.id}")
        now, wall = self.clock.monotonic(), self.clock.wall()
        try:
            directory = os.path.realpath(cwd or process_cwd(key.pid))
        except NoSuchProcess:
            raise AlreadyDead(key) from None  # it exited while being attached
        session = Session(
            id=session_id or new_session_id(), key=key, cwd=directory,
            argv=argv if argv is not None else process_argv(key.pid), labels=dict(labels or {}), policy=policy,
            started_at=wall, started_mono=now, timeout_s=timeout_s,
            deadline=now + timeout_s if timeout_s is not None else None, kill_on_timeout=kill_on_timeout,
            exit_file=exit_file, log_file=log_file, pgid=pgid, cgroup=cgroup, on_start=on_start, on_complete=on_complete,
            owner_uid=owner_uid, orphans_policy=orphans or self.orphans,
        )
        step = Step()
        locks_before = self.locks.snapshot(directory)
        fuse_before = self.fuses.snapshot(directory)
        if lock and not force:
            step.transitions += self.locks.acquire(
                Lock(directory, "auto", key, session.id, locked_at=wall, owner_uid=owner_uid), self.owner_alive)
        step.extend(self.tracker.add(session))
        self.fuses.session_started(directory)
        step.extend(self.adopt_cgroup(session))
        if ended and session.children:  # a tree whose root was over before we could follow it, its members not
            step.commands = [c for c in step.commands if not (isinstance(c, Watch) and c.key == key)]
            ended_as = reconcile.exit_file_status(session) or Exited.from_wait_status(key, None, RELIST)
            step.extend(self.tracker.on_exited(ended_as, now, wall))
            self._after_stops(step, now, wall)
        elif ended:  # a launch that was over before we could follow it
            step.extend(reconcile.stop_dead(self, session, wall))
            step.commands = []
            self._after_stops(step, now, wall)

        def undo() -> None:
            self.tracker.remove(session.id)
            self.locks.restore(locks_before)
            self.fuses.restore(directory, fuse_before)
            self._unwatch(key)

        watches = [c for c in step.commands if isinstance(c, Watch)]
        step.commands = [c for c in step.commands if not isinstance(c, Watch)]
        done = self.submit(step, undo=self._undoing(undo))
        for command in watches:
            self.watch(command)  # after add: an exit found at watch time finds its session
        if done is not None:
            await done
        return session

    async def stop(self, prefix: str, signum: int = signals.SIGTERM, grace_s: float = 5.0) -> Session:
        session = self.tracker.get(prefix)
        before = (session.stop_requested, session.kill_at)

        def undo() -> None:
            if session.state == "running":
                session.stop_requested, session.kill_at = before

        await self._request(self.tracker.request_stop(session.id, signum, grace_s, self.clock.monotonic()), undo)
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

    async def _take_lock(self, lock: Lock) -> Lock:
        before = self.locks.snapshot(lock.directory)
        await self._request(Step(self.locks.acquire(lock, self.owner_alive)), lambda: self.locks.restore(before))
        return lock

    async def lock(self, directory: str, *, by: str | None = None, reason: str | None = None, owner_uid: int | None = None) -> Lock:
        path = os.path.realpath(directory)
        return await self._take_lock(Lock(path, "manual", by=by, reason=reason, locked_at=self.clock.wall(), owner_uid=owner_uid))

    async def reserve_lock(self, directory: str, session_id: str, owner_uid: int | None = None) -> Lock:
        """Take a directory's lock for a session about to be launched: atomically, before the
        spawn, so two launches cannot both start there. `register` then hands it to the process."""
        path = os.path.realpath(directory)
        return await self._take_lock(Lock(path, "auto", None, session_id, locked_at=self.clock.wall(), owner_uid=owner_uid))

    def cancel_reservation(self, directory: str, session_id: str) -> asyncio.Future[None] | None:
        """A launch that failed before its command ran gives its reservation back. Not a
        request that can be refused: nothing runs there, so it is retried until stored."""
        path = os.path.realpath(directory)
        held = self.locks.locks.get(path)
        if held is None or held.owner is not None or held.session_id != session_id:
            return None
        return self.submit(Step(self.locks.release(path)))

    async def unlock(self, directory: str) -> None:
        path = os.path.realpath(directory)
        before = self.locks.snapshot(path)
        await self._request(Step(self.locks.release(path)), lambda: self.locks.restore(before))

    async def who_uses(self, directory: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(who_uses, directory)

    async def fuse_set(self, directory: str, ttl_s: float, action: str | None = None, owner_uid: int | None = None) -> DirFuse:
        path = os.path.realpath(directory)
        before = self.fuses.snapshot(path)
        fuse = self.fuses.set(path, ttl_s, action, busy=bool(self.tracker.running_in(path)),
                              now=self.clock.monotonic(), wall=self.clock.wall(), owner_uid=owner_uid)
        await self._save_fuse(path, before)
        return fuse

    async def fuse_extend(self, directory: str, by_s: float) -> DirFuse:
        path = os.path.realpath(directory)
        before = self.fuses.snapshot(path)
        fuse = self.fuses.extend(path, by_s, self.clock.monotonic())
        await self._save_fuse(path, before)
        return fuse

    async def fuse_cancel(self, directory: str) -> DirFuse:
        path = os.path.realpath(directory)
        before = self.fuses.snapshot(path)
        fuse = self.fuses.cancel(path)
        await self._save_fuse(path, before)
        return fuse

    async def _save_fuse(self, path: str, before: DirFuse | None) -> None:
        await self._request(Step(), lambda: self.fuses.restore(path, before))
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until everything decided so far is committed and acted on."""
        done = self.submit(Step(), always=True)
        assert done is not None
        await done


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))
