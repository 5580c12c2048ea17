"""Process events, the one vocabulary every source speaks.

Frozen, slotted dataclasses with a stable `type` string for the wire. An exit
status that a source cannot know is `None`, never a made-up 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from monitor.identity import ProcessKey

# Evidence names: which mechanism saw the event. `relist` is a check of the
# process's identity (gone from /proc, a zombie, or a reused PID) rather than an event.
NETLINK = "netlink"
PIDFD = "pidfd"
EXIT_FILE = "exit_file"
POLL = "poll"
RELIST = "relist"
FAKE = "fake"


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """A decoded wait(2) status: exactly one of exit_code and signal is set."""

    exit_code: int | None
    signal: int | None
    core_dumped: bool

    @classmethod
    def decode(cls, status: int) -> WaitStatus:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status), os.WCOREDUMP(status))
        return cls(os.WEXITSTATUS(status), None, False)


@dataclass(frozen=True, slots=True)
class Forked:
    """`parent` created the new process `child` (thread creation is not a fork)."""

    type: ClassVar[str] = "process.forked"
    parent: ProcessKey
    child: ProcessKey
    source: str
    kernel_ts_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "pid": self.child.pid,
            "ppid": self.parent.pid,
            "child": self.child.to_dict(),
            "parent": self.parent.to_dict(),
            "source": self.source,
            "kernel_ts_ns": self.kernel_ts_ns,
        }


@dataclass(frozen=True, slots=True)
class Execed:
    """The process `key` replaced its program (same PID, same identity)."""

    type: ClassVar[str] = "process.execed"
    key: ProcessKey
    source: str
    kernel_ts_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "pid": self.key.pid,
            "key": self.key.to_dict(),
            "source": self.source,
            "kernel_ts_ns": self.kernel_ts_ns,
        }


@dataclass(frozen=True, slots=True)
class Exited:
    """The whole thread group of `key` is gone.

    `exit_code` and `signal` are None when the source cannot know them. `kernel_ts_ns`
    is CLOCK_MONOTONIC of the exit as the kernel stamped it (netlink only);
    `observed_ns` is CLOCK_MONOTONIC when monitor learned of it.
    """

    type: ClassVar[str] = "process.exited"
    key: ProcessKey
    exit_code: int | None
    signal: int | None
    core_dumped: bool
    kernel_ts_ns: int | None
    source: str
    observed_ns: int = 0

    @classmethod
    def from_wait_status(
        cls, key: ProcessKey, status: int | None, source: str, kernel_ts_ns: int | None = None, observed_ns: int = 0
    ) -> Exited:
        if status is None:
            return cls(key, None, None, False, kernel_ts_ns, source, observed_ns)
        ws = WaitStatus.decode(status)
        return cls(key, ws.exit_code, ws.signal, ws.core_dumped, kernel_ts_ns, source, observed_ns)

    @property
    def shell_status(self) -> int | None:
        """What a shell would report: the exit code, or 128 + signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code

    @property
    def latency_ns(self) -> int | None:
        if self.kernel_ts_ns is None or not self.observed_ns:
            return None
        return self.observed_ns - self.kernel_ts_ns

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "pid": self.key.pid,
            "key": self.key.to_dict(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "core_dumped": self.core_dumped,
            "source": self.source,
            "kernel_ts_ns": self.kernel_ts_ns,
            "latency_ns": self.latency_ns,
        }


@dataclass(frozen=True, slots=True)
class Overrun:
    """The source lost events (a full receive buffer, a sequence gap).

    The source resyncs by itself: every watched key is verified, and those that died
    yield `Exited` after this event. `lost` is the number known lost, when known.
    """

    type: ClassVar[str] = "source.overrun"
    source: str
    lost: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "lost": self.lost}


Event = Forked | Execed | Exited | Overrun
EVENT_TYPES = {cls.type: cls for cls in (Forked, Execed, Exited, Overrun)}


# -- what the engine decides: transitions, persisted with the state and sent to subscribers ----


@dataclass(frozen=True, slots=True)
class Transition:
    """Base of the engine's decisions. `subject` names what it is about (a session id or a
    directory); with `type` it makes the stable id of its outbox row."""

    type: ClassVar[str] = "transition"

    @property
    def subject(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            data[name] = value.to_dict() if isinstance(value, ProcessKey) else value
        return data


@dataclass(frozen=True, slots=True)
class SessionStarted(Transition):
    type: ClassVar[str] = "session.started"
    session_id: str
    key: ProcessKey
    cwd: str

    @property
    def subject(self) -> str:
        return self.session_id


@dataclass(frozen=True, slots=True)
class SessionStopped(Transition):
    """The session's one stop. reason: exited (it ended by itself), killed (after a stop
    request), timeout (after its master timeout fired), lost (dead, nothing tells how),
    reboot (its boot is over), not_started (a launch registered, but the daemon died
    before its go: the command never ran). `orphans`: its descendants still alive at the
    stop, each {pid, key, argv} (empty when none)."""

    type: ClassVar[str] = "session.stopped"
    session_id: str
    reason: str
    exit_code: int | None
    signal: int | None
    evidence: str
    duration_s: float
    orphans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.session_id


@dataclass(frozen=True, slots=True)
class SessionOrphansGone(Transition):
    """Every orphan a stopped session left (`count` of them) is gone now."""

    type: ClassVar[str] = "session.orphans_gone"
    session_id: str
    count: int

    @property
    def subject(self) -> str:
        return self.session_id


@dataclass(frozen=True, slots=True)
class SessionTimedOut(Transition):
    type: ClassVar[str] = "session.timeout"
    session_id: str
    timeout_s: float

    @property
    def subject(self) -> str:
        return self.session_id


@dataclass(frozen=True, slots=True)
class ChildExited(Transition):
    type: ClassVar[str] = "child.exited"
    session_id: str
    key: ProcessKey
    exit_code: int | None
    signal: int | None

    @property
    def subject(self) -> str:
        return f"{self.session_id}/{self.key}"


@dataclass(frozen=True, slots=True)
class ChildUnobservable(Transition):
    type: ClassVar[str] = "child.unobservable"
    session_id: str
    key: ProcessKey

    @property
    def subject(self) -> str:
        return f"{self.session_id}/{self.key}"


@dataclass(frozen=True, slots=True)
class LockAcquired(Transition):
    type: ClassVar[str] = "lock.acquired"
    directory: str
    kind: str
    owner: ProcessKey | None
    session_id: str | None
    took_over_from: str | None = None  # who held it, dead, when it was taken over

    @property
    def subject(self) -> str:
        return f"{self.directory}@{self.owner or self.session_id or 'manual'}"


@dataclass(frozen=True, slots=True)
class LockReleased(Transition):
    """reason: owner_exited (evidence says how that was seen), unlocked, taken_over."""

    type: ClassVar[str] = "lock.released"
    directory: str
    kind: str
    owner: ProcessKey | None
    reason: str
    evidence: str | None
    session_id: str | None = None  # the session whose process held it

    @property
    def subject(self) -> str:
        return f"{self.directory}@{self.owner or 'manual'}"


@dataclass(frozen=True, slots=True)
class FuseFired(Transition):
    type: ClassVar[str] = "fuse.fired"
    directory: str
    action: str | None
    armed_at: float

    @property
    def subject(self) -> str:
        return f"{self.directory}@{self.armed_at}"


@dataclass(frozen=True, slots=True)
class FuseActionFailed(Transition):
    """A fired fuse's action did not succeed: it exited non-zero (exit_code / signal), was
    killed at its timeout (timed_out), or could not run (error)."""

    type: ClassVar[str] = "fuse.action_failed"
    directory: str
    action: str
    armed_at: float
    exit_code: int | None
    signal: int | None
    error: str | None
    timed_out: bool = False

    @property
    def subject(self) -> str:
        return f"{self.directory}@{self.armed_at}/action"


@dataclass(frozen=True, slots=True)
class HookFailed(Transition):
    """A session's hook (on_start, on_complete, or the config's) did not succeed: it exited
    non-zero (exit_code / signal), was killed at its timeout, or could not run (error)."""

    type: ClassVar[str] = "hook.failed"
    session_id: str
    hook: str
    exit_code: int | None
    signal: int | None
    error: str | None

    @property
    def subject(self) -> str:
        return f"{self.session_id}/{self.hook}"


@dataclass(frozen=True, slots=True)
class StateRecovered(Transition):
    """The state file was unusable at start-up (corrupt, truncated, not a database, its WAL
    cut): moved aside to `moved_to`, and the daemon started on a fresh store, with the
    launched sessions it could rebuild from their files (`sessions`). Sessions, locks and
    fuses it held otherwise are gone; the event log starts again (this is its first event)."""

    type: ClassVar[str] = "state.recovered"
    path: str
    moved_to: str
    reason: str
    sessions: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        return self.moved_to

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "path": self.path, "moved_to": self.moved_to, "reason": self.reason,
                "sessions": list(self.sessions)}


TRANSITION_TYPES = tuple(cls.type for cls in (SessionStarted, SessionStopped, SessionTimedOut, ChildExited, ChildUnobservable,
                                               LockAcquired, LockReleased, FuseFired, FuseActionFailed, HookFailed,
                                               StateRecovered,
                                               SessionOrphansGone))
