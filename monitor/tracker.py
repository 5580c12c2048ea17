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
from monitor.events import ChildExited, ChildUnobservable, Exited, Forked, SessionStarted, SessionStopped, SessionTimedOut, Transition
from monitor.identity import ProcessKey

Policy = Literal["root", "tree"]
DEFAULT_CHILD_GRACE_S = 5.0
DEFAULT_KILL_GRACE_S = 5.0


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
    """A command: tell the source to follow `key` (and its descendants)."""

    key: ProcessKey
    descendants: bool


Command = Signal | Watch


@dataclass
class Step:
    """What one input caused: transitions to commit, commands to carry out after the commit."""

    transitions: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    changed_sessions: set[str] = field(default_factory=set)
    cause_ns: int | None = None  # monotonic ns of the exit that caused it, when one did

    def extend(self, other: Step) -> Step:
        self.transitions += other.transitions
        self.commands += other.commands
        self.changed_sessions |= other.changed_sessions
        self.cause_ns = self.cause_ns or other.cause_ns
        return self


@dataclass
class Child:
    key: ProcessKey
    parent: ProcessKey
    state: Literal["running", "exited", "unobservable"] = "running"
    exit_code: int | None = None
    signal: int | None = None
    lost_since: float | None = None  # monotonic: when it stopped being observable

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "parent": self.parent.to_dict(), "state": self.state,
                "exit_code": self.exit_code, "signal": self.signal, "lost_since": self.lost_since}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Child:
        return cls(ProcessKey.from_dict(d["key"]), ProcessKey.from_dict(d["parent"]), d["state"],
                   d["exit_code"], d["signal"], d["lost_since"])


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
    children: dict[ProcessKey, Child] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("key", "children")}
        data["key"] = self.key.to_dict()
        data["children"] = [c.to_dict() for c in self.children.values()]
        return data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        data = dict(d)
        data["key"] = ProcessKey.from_dict(d["key"])
        data["children"] = {c.key: c for c in map(Child.from_dict, d.get("children", []))}
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """The session as clients see it (protocol names: pid, state, reason, ...)."""
        return {"id": self.id, "pid": self.key.pid, "key": self.key.to_dict(), "cwd": self.cwd, "argv": self.argv,
                "labels": self.labels, "policy": self.policy, "state": self.state, "reason": self.reason,
                "exit_code": self.exit_code, "signal": self.signal, "evidence": self.evidence,
                "started_at": self.started_at, "stopped_at": self.stopped_at, "duration_s": self.duration_s,
                "timeout_s": self.timeout_s, "timed_out": self.timed_out_at is not None, "log_file": self.log_file,
                "children": [c.to_dict() for c in self.children.values()]}


def new_session_id() -> str:
    return secrets.token_hex(6)


class Tracker:
    """Every session, indexed by the keys of the processes it follows."""

    def __init__(self, *, child_grace_s: float = DEFAULT_CHILD_GRACE_S) -> None:
        self.child_grace_s = child_grace_s
        self.sessions: dict[str, Session] = {}
        self._by_key: dict[ProcessKey, str] = {}  # root and descendants of running sessions
        self._running: dict[str, Session] = {}
        self._running_by_dir: dict[str, set[str]] = {}

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

    def session_of(self, key: ProcessKey) -> Session | None:
        sid = self._by_key.get(key)
        return self.sessions.get(sid) if sid else None

    def forget_stopped(self, before: float) -> int:
        """Drop from memory the sessions that stopped before `before` (wall); the store keeps them."""
        old = [sid for sid, s in self.sessions.items() if s.state == "stopped" and (s.stopped_at or 0.0) < before]
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
            self._by_key[session.key] = session.id
            for child in session.children.values():
                if child.state == "running":
                    self._by_key[child.key] = session.id

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

    def add(self, session: Session) -> Step:
        if session.id in self.sessions:
            raise ValueError(f"session {session.id} exists")
        if session.key in self._by_key:
            raise ValueError(f"process {session.key} is already followed by session {self._by_key[session.key]}")
        self.load(session)
        return Step([SessionStarted(session.id, session.key, session.cwd)], [Watch(session.key, True)], {session.id})

    def on_exited(self, event: Exited, now: float, wall: float) -> Step:
        sid = self._by_key.pop(event.key, None)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.state != "running":
            return Step()
        step = Step(changed_sessions={session.id})
        if event.key == session.key:
            session.root_exit = {"exit_code": event.exit_code, "signal": event.signal, "evidence": event.source}
        else:
            child = session.children[event.key]
            if child.state == "running":
                child.state, child.exit_code, child.signal, child.lost_since = "exited", event.exit_code, event.signal, None
                step.transitions.append(ChildExited(session.id, child.key, event.exit_code, event.signal))
        if session.root_exit is not None and (session.policy == "root" or not self.blocking_children(session.id)):
            step.extend(self._stop(session, wall))
        return step

    def on_forked(self, event: Forked) -> Step:
        sid = self._by_key.get(event.parent)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.state != "running" or event.child in session.children:
            return Step()
        session.children[event.child] = Child(event.child, event.parent)
        self._by_key[event.child] = session.id
        return Step(changed_sessions={session.id})

    def on_unobservable(self, key: ProcessKey, now: float) -> Step:
        """The source cannot follow this child (it could not watch it, or its check failed)."""
        session = self.session_of(key)
        if session is None or key == session.key:
            return Step()
        child = session.children[key]
        if child.state == "running" and child.lost_since is None:
            child.lost_since = now
            return Step(changed_sessions={session.id})
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
                if not alive(session.key):
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
            for child in session.children.values():
                if child.state == "running" and child.lost_since is not None and now - child.lost_since >= self.child_grace_s:
                    child.state = "unobservable"
                    self._by_key.pop(child.key, None)
                    step.transitions.append(ChildUnobservable(session.id, child.key))
                    step.changed_sessions.add(session.id)
                    if session.root_exit is not None and not self.blocking_children(session.id):
                        step.extend(self._stop(session, wall))
                        break
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
        return min(times, default=None)

    def stop_unverifiable(self, session: Session, reason: str, exit_status: Exited | None, wall: float) -> Step:
        """At restart: a session whose process died (or whose boot ended) while we were down."""
        if session.state != "running":
            return Step()
        if exit_status is not None:
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
        for key in [session.key, *session.children]:
            if self._by_key.get(key) == session.id:
                del self._by_key[key]
        stopped = SessionStopped(session.id, reason, session.exit_code, session.signal, session.evidence, session.duration_s)
        return Step([stopped], [], {session.id})
