"""Directory locks, owned by a process (auto) or held by a name (manual).

A pure state machine over canonical paths (the engine resolves them). A lock
covers its subtree: a directory inside a locked one, or above one, is refused.
Acquiring checks and takes in one step; a live owner is refused with an error
that names it; a dead owner's lock is taken over, and the takeover is reported.
An auto lock is released by its owner's `Exited` itself, never by a sweep.

Every directory whose lock changes, whatever the reason (a handover of a launch's
reservation announces nothing, yet changes the row), is added to `changed`: the
engine persists exactly those rows, so persistence cannot miss a mutation.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from monitor.errors import MonitorError
from monitor.events import LockAcquired, LockReleased, Transition
from monitor.identity import ProcessKey


class LockHeld(MonitorError):
    """The directory (or one above or below it) is locked by someone alive."""

    def __init__(self, wanted: str, lock: Lock) -> None:
        self.lock = lock
        where = "" if lock.directory == wanted else f" (through {lock.directory})"
        super().__init__(f"{wanted} is locked{where} by {lock.holder()}")


class NotLocked(MonitorError):
    def __init__(self, directory: str) -> None:
        super().__init__(f"{directory} is not locked")


@dataclass
class Lock:
    directory: str
    kind: Literal["auto", "manual"]
    owner: ProcessKey | None = None
    session_id: str | None = None
    by: str | None = None
    reason: str | None = None
    locked_at: float = 0.0  # wall
    owner_uid: int | None = None

    def holder(self) -> str:
        if self.kind == "auto" and self.owner is None:
            return f"session {self.session_id} (starting)"
        if self.kind == "manual":
            return f"{self.by or 'someone'}" + (f": {self.reason}" if self.reason else "")
        return f"process {self.owner.pid if self.owner else '?'}" + (f" of session {self.session_id}" if self.session_id else "")

    def public(self) -> dict[str, Any]:
        return {"directory": self.directory, "kind": self.kind, "pid": self.owner.pid if self.owner else None,
                "key": self.owner.to_dict() if self.owner else None, "session_id": self.session_id,
                "by": self.by, "reason": self.reason, "locked_at": self.locked_at}

    def to_dict(self) -> dict[str, Any]:
        return {**self.public(), "owner_uid": self.owner_uid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lock:
        return cls(d["directory"], d["kind"], ProcessKey.from_dict(d["key"]) if d.get("key") else None,
                   d.get("session_id"), d.get("by"), d.get("reason"), d.get("locked_at", 0.0), d.get("owner_uid"))


def overlaps(a: str, b: str) -> bool:
    """Equal, or one inside the other (by path components, not by string prefix)."""
    if a == b:
        return True
    a_, b_ = a.rstrip(os.sep) + os.sep, b.rstrip(os.sep) + os.sep
    return a_.startswith(b_) or b_.startswith(a_)


class LockTable:
    """Locks by directory, with the indexes that keep every operation cheap at 10,000 locks:
    conflicts are the directory's ancestors (dictionary lookups) and its descendants (a
    range of a sorted list), and an owner's locks are found through an owner index."""

    def __init__(self) -> None:
        self.locks: dict[str, Lock] = {}
        self._sorted: list[str] = []
        self._by_owner: dict[ProcessKey, set[str]] = {}
        self.changed: set[str] = set()  # directories whose row differs from the store's

    def load(self, lock: Lock) -> None:
        self._put(lock)
        self.changed.discard(lock.directory)  # it is the store's row

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def snapshot(self, directory: str) -> dict[str, Lock | None]:
        """The locks an acquire of `directory` may touch, as they are now (for `restore`)."""
        return {directory: self.locks.get(directory), **{lock.directory: lock for lock in self.conflicts(directory)}}

    def restore(self, snapshot: dict[str, Lock | None]) -> None:
        """Put these directories back as they were (undoing a change that was not stored)."""
        for directory, lock in snapshot.items():
            if self.locks.get(directory) is not lock:
                self._drop(directory)
                if lock is not None:
                    self._put(lock)

    def conflicts(self, directory: str) -> list[Lock]:
        found = []
        path = directory
        while True:  # the directory itself and every directory above it
            if path in self.locks:
                found.append(self.locks[path])
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        prefix = directory.rstrip(os.sep) + os.sep
        for d in self._sorted[bisect.bisect_left(self._sorted, prefix):]:  # every directory below it
            if not d.startswith(prefix):
                break
            if d != directory:
                found.append(self.locks[d])
        return found

    def owned_by(self, key: ProcessKey) -> list[Lock]:
        return [self.locks[d] for d in self._by_owner.get(key, ())]

    def acquire(self, lock: Lock, alive: Callable[[ProcessKey], bool]) -> list[Transition]:
        """Take `lock` or raise LockHeld; locks of dead owners in the way are taken over."""
        transitions: list[Transition] = []
        dead: list[Lock] = []
        for held in self.conflicts(lock.directory):
            if held.kind == "auto" and held.owner is not None and held.owner == lock.owner:
                return []  # the same process again: it has it already
            if held.owner is None and held.kind == "auto" and held.session_id == lock.session_id:
                dead.append(held)  # the reservation a launch made for this very session
                continue
            if held.kind == "manual" or held.owner is None or alive(held.owner):
                raise LockHeld(lock.directory, held)
            dead.append(held)
        reserved = [h for h in dead if h.owner is None]
        dead = [h for h in dead if h.owner is not None]
        for held in reserved:
            self._drop(held.directory)  # the session now holds it through its process
        for held in dead:
            self._drop(held.directory)
            transitions.append(LockReleased(held.directory, held.kind, held.owner, "taken_over", "relist", held.session_id))
        self._put(lock)
        if reserved and lock.directory in {h.directory for h in reserved}:
            return transitions  # acquired already, when reserved: no second LockAcquired
        took_over = ", ".join(h.holder() for h in dead) or None
        transitions.append(LockAcquired(lock.directory, lock.kind, lock.owner, lock.session_id, took_over))
        return transitions

    def release(self, directory: str) -> list[Transition]:
        lock = self._drop(directory)
        if lock is None:
            raise NotLocked(directory)
        return [LockReleased(lock.directory, lock.kind, lock.owner, "unlocked", None, lock.session_id)]

    def release_owner(self, key: ProcessKey, evidence: str) -> list[Transition]:
        """Every lock `key` owns, released on the evidence of its exit."""
        released = [self._drop(d) for d in list(self._by_owner.get(key, ()))]
        return [LockReleased(lock.directory, lock.kind, lock.owner, "owner_exited", evidence, lock.session_id)
                for lock in released if lock]

    def _put(self, lock: Lock) -> None:
        self.changed.add(lock.directory)
        if lock.directory not in self.locks:
            bisect.insort(self._sorted, lock.directory)
        self.locks[lock.directory] = lock
        if lock.owner is not None:
            self._by_owner.setdefault(lock.owner, set()).add(lock.directory)

    def _drop(self, directory: str) -> Lock | None:
        lock = self.locks.pop(directory, None)
        if lock is None:
            return None
        self.changed.add(directory)
        del self._sorted[bisect.bisect_left(self._sorted, directory)]
        if lock.owner is not None:
            owned = self._by_owner[lock.owner]
            owned.discard(directory)
            if not owned:
                del self._by_owner[lock.owner]
        return lock
