"""Sessions, their process trees and child tasks, and each session's lifecycle fuse.

A pure state machine: events and the time go in, transitions and commands come
out; no I/O. A session stops exactly once, on positive evidence only (an `Exited`
of its root, or of its whole tree under the `tree` policy). Its lifecycle fuse
has three prongs, and the first wins: exit evidence from any source, the
launcher's exit file (a source too), and a master timeout. When death and the
timeout are both due, death wins: the engine applies events before time, and a
timeout is fired only for a session whose root still checks alive.
"""

from __future__ import annotations

import secrets
import signal as signals
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.errors import MonitorError
from monitor.events import (
    ChildExited,
    ChildUnobservable,
    Exited,
    Forked,
    SessionOrphansGone,
    SessionStarted,
    SessionStopped,
    SessionTimedOut,
    Transition,
)
from monitor.identity import ProcessKey

Policy = Literal["root", "tree"]
Orphans = Literal["keep", "kill"]
ORPHANS = ("keep", "kill")
DEFAULT_CHILD_GRACE_S = 5.0
DEFAULT_KILL_GRACE_S = 5.0
RECENT_CHILDREN = 16  # ended children kept (with their status) per session; the rest are counted


class UnknownSession(MonitorError):
    def __init__(self, prefix: str, matches: int = 0) -> None:
        self.prefix = prefix
        super().__init__(f"no session matches {prefix!r}" if not matches else f"{matches} sessions match {prefix!r}: give more of the id")


@dataclass(frozen=True, slots=True)
class Signal:
    """A command: send `signum` to the process group led by `key` (or the process)."""

    key: ProcessKey
    signum: int


@dataclass(frozen=True, slots=True)
class Watch:
    """A command: tell the source to follow `key` (and its descendants; with `existing`,
    those it has now too)."""

    key: ProcessKey
    descendants: bool
    existing: bool = False


@dataclass(frozen=True, slots=True)
class SignalOrphans:
    """A command: send `signum` to each live orphan of a stopped session (through its
    cgroup, or a pidfd per key: a reused PID is never hit)."""

    session_id: str
    signum: int


Command = Signal | Watch | SignalOrphans
ChildRow = tuple[str, ProcessKey]  # (session id, child key): one row of the children table


@dataclass
class Step:
    """What one input caused: transitions to commit, commands to carry out after the commit."""

    transitions: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    changed_sessions: set[str] = field(default_factory=set)
    cause_ns: int | None = None  # monotonic ns of the exit that caused it, when one did
    # Children changed (None: forgotten): a row each, so a fork or an exit costs the same
    # however many children the session had; and the sessions whose child counts changed.
    children: dict[ChildRow, Child | None] = field(default_factory=dict)
    child_counts: set[str] = field(default_factory=set)

    def extend(self, other: Step) -> Step:
        self.transitions += other.transitions
        self.commands += other.commands
        self.changed_sessions |= other.changed_sessions
        self.cause_ns = self.cause_ns or other.cause_ns
        self.children.update(other.children)
        self.child_counts |= other.child_counts
        return self


@dataclass
class Child:
    key: ProcessKey
    parent: ProcessKey
    state: Literal["running", "exited", "unobservable"] = "running"
    exit_code: int | None = None
    signal: int | None = None
    lost_since: float | None = None  # monotonic: when it stopped being observable
    seq: int = 0  # the session's count of child changes at its last one: orders the ended

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "parent": self.parent.to_dict(), "state": self.state,
                "exit_code": self.exit_code, "signal": self.signal, "lost_since": self.lost_since, "seq": self.seq}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Child:
        return cls(ProcessKey.from_dict(d["key"]), ProcessKey.from_dict(d["parent"]), d["state"],
                   d["exit_code"], d["signal"], d["lost_since"], d.get("seq", 0))


@dataclass
class Session:
    id: str
    key: ProcessKey
    cwd: str
    argv: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    policy: Policy = "root"
    started_at: float = 0.0  # wall
    started_mono: float = 0.0
    timeout_s: float | None = None
    deadline: float | None = None  # monotonic, valid in `key.boot_id`
    kill_on_timeout: bool = False
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    exit_file: str | None = None
    log_file: str | None = None
    pgid: int | None = None  # the process group a launch put it in: stop signals all of it
    cgroup: str | None = None  # the cgroup v2 directory a launch put it in, where one was writable
    on_start: str | None = None  # a shell command run (as its owner) once it is followed
    on_complete: str | None = None  # a shell command run (as its owner) once it has stopped
    owner_uid: int | None = None
    state: Literal["running", "stopped"] = "running"
    timed_out_at: float | None = None  # monotonic
    kill_at: float | None = None  # monotonic: when TERM gets its KILL
    stop_requested: bool = False
    root_exit: dict[str, Any] | None = None  # tree policy: the root's end, while others live
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    evidence: str | None = None
    stopped_at: float | None = None  # wall
    duration_s: float | None = None
    orphans_policy: Orphans = "keep"  # kill: its descendants alive at its stop are killed
    orphans: list[dict[str, Any]] = field(default_factory=list)  # {pid, key, argv, state}, set at the stop
    orphans_kill_at: float | None = None  # monotonic: when the orphans' TERM gets its KILL
    # Stored as rows of their own (the children table), not in the session's own record:
    children: dict[ProcessKey, Child] = field(default_factory=dict)  # live ones
    recent: list[Child] = field(default_factory=list)  # the last RECENT_CHILDREN that ended, oldest first
    children_exited: int = 0
    children_unobservable: int = 0
    child_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The session's own record: constant in size, however many children it had."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in PER_CHILD}
        data["key"] = self.key.to_dict()
        return data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        """From its record and its child rows (`children`: every stored child, any state;
        a record from before the children table holds them itself)."""
        data = {k: v for k, v in d.items() if k not in PER_CHILD}
        data["key"] = ProcessKey.from_dict(d["key"])
        session = cls(**data)
        ended = []
        for child in map(Child.from_dict, d.get("children", [])):
            if child.state == "running":
                session.children[child.key] = child
            else:
                ended.append(child)
        ended.sort(key=lambda c: c.seq)
        session.recent = ended[-RECENT_CHILDREN:]
        counts = d.get("child_counts")
        if counts is not None:
            session.children_exited, session.children_unobservable = counts
        else:  # a record from before the children table: it had them all
            session.children_exited = sum(c.state == "exited" for c in ended)
            session.children_unobservable = sum(c.state == "unobservable" for c in ended)
        session.child_seq = max([c.seq for c in (*session.children.values(), *ended)], default=0)
        return session

    def child_summary(self) -> dict[str, int]:
        return {"running": sum(c.state == "running" for c in self.children.values()), "exited": self.children_exited,
                "unobservable": self.children_unobservable}

    def child(self, key: ProcessKey) -> Child | None:
        """A live child, or one of the last that ended (None: never one, or forgotten)."""
        found = self.children.get(key)
        if found is None:
            found = next((c for c in reversed(self.recent) if c.key == key), None)
        return found

    def live_orphans(self) -> list[dict[str, Any]]:
        return [o for o in self.orphans if o["state"] == "running"]

    def public(self) -> dict[str, Any]:
        """The session as clients see it (protocol names: pid, state, reason, ...)."""
        return {"id": self.id, "pid": self.key.pid, "key": self.key.to_dict(), "cwd": self.cwd, "argv": self.argv,
                "labels": self.labels, "policy": self.policy, "state": self.state, "reason": self.reason,
                "exit_code": self.exit_code, "signal": self.signal, "evidence": self.evidence,
                "started_at": self.started_at, "stopped_at": self.stopped_at, "duration_s": self.duration_s,
                "timeout_s": self.timeout_s, "timed_out": self.timed_out_at is not None, "log_file": self.log_file,
                "children": [c.to_dict() for c in (*self.recent, *self.children.values())],
                "child_summary": self.child_summary(), "orphans_policy": self.orphans_policy, "orphans": self.orphans,
                "root_exit": self.root_exit}


PER_CHILD = frozenset({"key", "children", "recent", "children_exited", "children_unobservable", "child_seq", "child_counts"})


def new_session_id() -> str:
    return secrets.token_hex(6)


class Tracker:
    """Every session, indexed by the keys of the processes it follows."""

    def __init__(self, *, child_grace_s: float = DEFAULT_CHILD_GRACE_S) -> None:
        self.child_grace_s = child_grace_s
        self.sessions: dict[str, Session] = {}
        self._by_key: dict[ProcessKey, str] = {}  # root and descendants of running sessions
        self._roots: dict[ProcessKey, str] = {}  # roots of running sessions, dead or alive
        self._running: dict[str, Session] = {}
        self._running_by_dir: dict[str, set[str]] = {}
        self._orphan_of: dict[ProcessKey, str] = {}  # live orphans of stopped sessions
        self._orphaned: dict[str, Session] = {}  # stopped sessions with live orphans

    # -- queries ----------------------------------------------------------------------------

    def get(self, prefix: str) -> Session:
        """A session by a unique prefix of its id."""
        if prefix in self.sessions:
            return self.sessions[prefix]
        matches = [s for sid, s in self.sessions.items() if sid.startswith(prefix)] if prefix else []
        if len(matches) != 1:
            raise UnknownSession(prefix, len(matches))
        return matches[0]

    def running(self) -> list[Session]:
        return list(self._running.values())

    def running_in(self, directory: str) -> list[Session]:
        return [self.sessions[sid] for sid in self._running_by_dir.get(directory, ())]

    def blocking_children(self, session_id: str) -> list[Child]:
        """The children the parent should still wait for: running and observable.

        Never blocks forever: a child that cannot be observed turns unobservable after
        the grace period, and an exited or unobservable child does not block.
        """
        return [c for c in self.get(session_id).children.values() if c.state == "running"]

    def watched_keys(self) -> Iterable[ProcessKey]:
        return self._by_key.keys()

    def session_rooted_at(self, key: ProcessKey) -> Session | None:
        """The running session whose root is `key`, even once the root has ended."""
        sid = self._roots.get(key)
        return self.sessions[sid] if sid is not None else None

    def holds_tree(self, key: ProcessKey) -> bool:
        """`key` is the root of a running `tree` session: what it owns (its directory's
        lock) is held until the whole tree is gone, even after the root itself."""
        session = self.session_rooted_at(key)
        return session is not None and session.policy == "tree"

    def orphaned(self) -> list[Session]:
        """Stopped sessions some of whose descendants still live."""
        return list(self._orphaned.values())

    def session_of(self, key: ProcessKey) -> Session | None:
        sid = self._by_key.get(key)
        return self.sessions.get(sid) if sid else None

    def forget_stopped(self, before: float) -> int:
        """Drop from memory the sessions that stopped before `before` (wall); the store keeps them.
        Not while orphans of theirs live: those are still followed."""
        old = [sid for sid, s in self.sessions.items()
               if s.state == "stopped" and (s.stopped_at or 0.0) < before and sid not in self._orphaned]
        for sid in old:
            del self.sessions[sid]
        return len(old)

    # -- inputs -----------------------------------------------------------------------------

    def load(self, session: Session) -> None:
        """A session from the store, as it was: no transition (it happened before)."""
        self.sessions[session.id] = session
        if session.state == "running":
            self._running[session.id] = session
            self._running_by_dir.setdefault(session.cwd, set()).add(session.id)
            self._roots[session.key] = session.id
            if session.root_exit is None:
                self._by_key[session.key] = session.id
            for child in session.children.values():
                if child.state == "running":
                    self._by_key[child.key] = session.id
        elif session.live_orphans():
            self._orphaned[session.id] = session
            for orphan in session.live_orphans():
                self._orphan_of[ProcessKey.from_dict(orphan["key"])] = session.id

    def remove(self, session_id: str) -> None:
        """Forget a session that was added but never stored (its commit failed): as if never added."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        self._running.pop(session_id, None)
        in_dir = self._running_by_dir.get(session.cwd)
        if in_dir is not None:
            in_dir.discard(session_id)
            if not in_dir:
                del self._running_by_dir[session.cwd]
        for key in [session.key, *session.children]:
            if self._by_key.get(key) == session_id:
                del self._by_key[key]
        if self._roots.get(session.key) == session_id:
            del self._roots[session.key]

    def add(self, session: Session) -> Step:
        if session.id in self.sessions:
            raise ValueError(f"session {session.id} exists")
        if session.key in self._by_key:
            raise ValueError(f"process {session.key} is already followed by session {self._by_key[session.key]}")
        self.load(session)
        watch = Watch(session.key, True, existing=session.policy == "tree")
        return Step([SessionStarted(session.id, session.key, session.cwd)], [watch], {session.id})

    def on_exited(self, event: Exited, now: float, wall: float) -> Step:
        sid = self._by_key.pop(event.key, None)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.state != "running":
            return self._orphan_exited(event.key)
        if event.key == session.key:
            session.root_exit = {"exit_code": event.exit_code, "signal": event.signal, "evidence": event.source}
            step = Step(changed_sessions={session.id})
        else:
            step = Step()
            child = session.children.get(event.key)
            if child is not None and child.state == "running":
                child.exit_code, child.signal = event.exit_code, event.signal
                self._ended(session, child, "exited", step)
                step.transitions.append(ChildExited(session.id, child.key, event.exit_code, event.signal))
        if session.root_exit is not None and (session.policy == "root" or not self.blocking_children(session.id)):
            step.extend(self._stop(session, wall))
        return step

    def on_forked(self, event: Forked) -> Step:
        sid = self._by_key.get(event.parent)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.state != "running":
            return Step()
        return self._add_child(session, event.child, event.parent)

    def adopt(self, session_id: str, keys: Iterable[ProcessKey]) -> Step:
        """Members found by the kernel rather than by a fork event (a launched session's
        cgroup): followed as children of the root, unless followed already."""
        session = self.sessions[session_id]
        step = Step()
        if session.state == "running":
            for key in keys:
                if key != session.key and key not in self._by_key:
                    step.extend(self._add_child(session, key, session.key))
        return step

    def _add_child(self, session: Session, key: ProcessKey, parent: ProcessKey) -> Step:
        if key in session.children or key in self._by_key:
            return Step()
        session.child_seq += 1
        child = session.children[key] = Child(key, parent, seq=session.child_seq)
        self._by_key[key] = session.id
        return Step(children={(session.id, key): child})

    def _ended(self, session: Session, child: Child, state: Literal["exited", "unobservable"], step: Step) -> None:
        """A child is over: it joins the last few ended, the oldest of those is forgotten."""
        child.state, child.lost_since = state, None
        session.child_seq += 1
        child.seq = session.child_seq
        del session.children[child.key]
        session.recent.append(child)
        step.children[(session.id, child.key)] = child
        if len(session.recent) > RECENT_CHILDREN:
            gone = session.recent.pop(0)
            step.children[(session.id, gone.key)] = None
        if state == "exited":
            session.children_exited += 1
        else:
            session.children_unobservable += 1
        step.child_counts.add(session.id)

    # -- orphans ----------------------------------------------------------------------------

    def set_orphans(self, session_id: str, orphans: list[tuple[ProcessKey, list[str]]], now: float) -> Step:
        """A stopped session's descendants that outlived it (the engine found them alive):
        recorded, followed until they are gone, and signalled when the session says kill."""
        session = self.sessions[session_id]
        assert session.state == "stopped"
        session.orphans = [{"pid": k.pid, "key": k.to_dict(), "argv": argv, "state": "running"} for k, argv in orphans]
        step = Step(changed_sessions={session.id})
        if not orphans:
            return step
        self._orphaned[session.id] = session
        for key, _argv in orphans:
            self._orphan_of[key] = session.id
            step.commands.append(Watch(key, False))
        if session.orphans_policy == "kill":
            step.commands.append(SignalOrphans(session.id, signals.SIGTERM))
            session.orphans_kill_at = now + session.kill_grace_s
        return step

    def _orphan_exited(self, key: ProcessKey) -> Step:
        sid = self._orphan_of.pop(key, None)
        if sid is None:
            return Step()
        session = self.sessions[sid]
        for orphan in session.orphans:
            if orphan["state"] == "running" and ProcessKey.from_dict(orphan["key"]) == key:
                orphan["state"] = "exited"
        step = Step(changed_sessions={sid})
        if not session.live_orphans():
            del self._orphaned[sid]
            session.orphans_kill_at = None
            step.transitions.append(SessionOrphansGone(sid, len(session.orphans)))
        return step

    def on_unobservable(self, key: ProcessKey, now: float) -> Step:
        """The source cannot follow this child (it could not watch it, or its check failed)."""
        session = self.session_of(key)
        if session is None or key == session.key:
            return Step()
        child = session.children.get(key)
        if child is not None and child.state == "running" and child.lost_since is None:
            child.lost_since = now
            return Step(children={(session.id, key): child})
        return Step()

    def request_stop(self, session_id: str, signum: int, grace_s: float, now: float) -> Step:
        """`monitor stop`: TERM (or `signum`) now, KILL after the grace; the stop itself
        comes with the death."""
        session = self.get(session_id)
        if session.state != "running":
            return Step()
        session.stop_requested = True
        session.kill_at = now + grace_s if signum != signals.SIGKILL else None
        return Step(commands=[Signal(session.key, signum)], changed_sessions={session.id})

    def tick(self, now: float, wall: float, alive: Callable[[ProcessKey], bool]) -> Step:
        """Time-driven transitions: master timeouts, KILL after the grace, child grace periods.

        `alive` is the engine's check of a root before its timeout fires: a root found dead
        here is a death (positive evidence), and death wins over the timeout.
        """
        step = Step()
        for session in self.running():
            if session.deadline is not None and session.timed_out_at is None and now >= session.deadline:
                if session.root_exit is None and not alive(session.key):
                    continue  # its death is on its way (or the relist will find it): death wins
                session.timed_out_at = now
                step.transitions.append(SessionTimedOut(session.id, session.timeout_s or 0.0))
                step.changed_sessions.add(session.id)
                if session.kill_on_timeout:
                    step.commands.append(Signal(session.key, signals.SIGTERM))
                    session.kill_at = now + session.kill_grace_s
            if session.kill_at is not None and now >= session.kill_at:
                session.kill_at = None
                step.commands.append(Signal(session.key, signals.SIGKILL))
                step.changed_sessions.add(session.id)
            for child in list(session.children.values()):
                if child.state == "running" and child.lost_since is not None and now - child.lost_since >= self.child_grace_s:
                    self._by_key.pop(child.key, None)
                    self._ended(session, child, "unobservable", step)
                    step.transitions.append(ChildUnobservable(session.id, child.key))
                    if session.root_exit is not None and not self.blocking_children(session.id):
                        step.extend(self._stop(session, wall))
                        break
        for session in self.orphaned():
            if session.orphans_kill_at is not None and now >= session.orphans_kill_at:
                session.orphans_kill_at = None
                step.commands.append(SignalOrphans(session.id, signals.SIGKILL))
                step.changed_sessions.add(session.id)
        return step

    def next_deadline(self) -> float | None:
        times = []
        for s in self.running():
            if s.deadline is not None and s.timed_out_at is None:
                times.append(s.deadline)
            if s.kill_at is not None:
                times.append(s.kill_at)
            times += [c.lost_since + self.child_grace_s for c in s.children.values()
                      if c.state == "running" and c.lost_since is not None]
        times += [s.orphans_kill_at for s in self.orphaned() if s.orphans_kill_at is not None]
        return min(times, default=None)

    def stop_unverifiable(self, session: Session, reason: str, exit_status: Exited | None, wall: float) -> Step:
        """At restart: a session whose process died (or whose boot ended) while we were down."""
        if session.state != "running":
            return Step()
        if session.root_exit is not None:
            pass  # a tree session's root ended before: its end is the one to report
        elif exit_status is not None:
            session.root_exit = {"exit_code": exit_status.exit_code, "signal": exit_status.signal, "evidence": exit_status.source}
        else:
            session.root_exit = {"exit_code": None, "signal": None, "evidence": "relist"}
        return self._stop(session, wall, reason=reason)

    # -- the one stop -----------------------------------------------------------------------

    def _stop(self, session: Session, wall: float, reason: str | None = None) -> Step:
        assert session.state == "running" and session.root_exit is not None
        if reason is None:
            reason = "timeout" if session.timed_out_at is not None else "killed" if session.stop_requested else "exited"
        session.state = "stopped"
        del self._running[session.id]
        in_dir = self._running_by_dir[session.cwd]
        in_dir.discard(session.id)
        if not in_dir:
            del self._running_by_dir[session.cwd]
        session.reason = reason
        session.exit_code = session.root_exit["exit_code"]
        session.signal = session.root_exit["signal"]
        session.evidence = session.root_exit["evidence"]
        session.stopped_at = wall
        session.duration_s = max(0.0, wall - session.started_at)
        session.deadline = session.kill_at = None
        self._roots.pop(session.key, None)
        for key in [session.key, *session.children]:
            if self._by_key.get(key) == session.id:
                del self._by_key[key]
        stopped = SessionStopped(session.id, reason, session.exit_code, session.signal, session.evidence, session.duration_s)
        return Step([stopped], [], {session.id})
